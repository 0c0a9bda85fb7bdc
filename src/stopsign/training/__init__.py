"""Layer 5, training: the epoch loop (fitting), sources of batches (sources), K-fold (crossval), the run folder (runs), train() (trainer), tune()."""
