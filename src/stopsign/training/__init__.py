"""Layer 5, training (inference's sibling: neither imports the other): the epoch loop (fitting), sources of batches
(sources), K-fold (crossval), what a run records (runs), the plan every run shares (plan), train() (trainer), tune()."""
