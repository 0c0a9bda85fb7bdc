"""The review page's HTTP service: a FastAPI app over one Review (training/review.py) and its LabelStore.

Photos are sent only from the data set or the --add folder, looked up by number: no route takes a path. A
decision made against a label that is no longer the entry's is 409. Decisions go straight to the data set's files
(data/labels.py); the items' states here are this process's view, refreshed from the files on each decision.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from ..data.labels import Conflict, LabelStore
from ..errors import DataError
from ..files import relative
from ..training.review import Review
from .serve import page_app

MAX_BODY_BYTES = 16 * 1024  # a decision is a few dozen bytes


def too_large(size: int) -> str:
    return f"request too large: {size} bytes; a decision is at most {MAX_BODY_BYTES} bytes"


class DecisionBody(BaseModel):
    id: int
    action: Literal["set", "keep", "exclude"]
    label: str | None = Field(default=None, max_length=200)
    against: str | None = Field(default=None, max_length=200)  # the label the reviewer saw (null: none)
    client: str | None = Field(default=None, max_length=64)  # one page: undo takes back its own decisions


class UndoBody(BaseModel):
    client: str | None = Field(default=None, max_length=64)


class ReviewSession:
    """What the app serves over one Review: its items' states (behind `lock`; the files have their own lock, in
    data/labels.py), the label store that decisions go to, and the files the app may send."""

    def __init__(self, review: Review, store: LabelStore):
        self.store, self.names, self.root = store, store.class_names, review.data.root
        self.items = [{"id": number, "suspect": s, "photo": s.path, "new": s.new, "label": s.given, "decisions": [],
                       "key": None if s.new else store.key(s.path)} for number, s in enumerate(review.suspects)]
        # Every file the app may send, with its real path now: a file swapped for a link afterwards is refused.
        self.allowed = {str(path): os.path.realpath(path) for path in
                        [s.path for s in review.data.samples] + [s.path for s in review.suspects]}
        self.lock = threading.Lock()  # the items' states

    def public(self, item: dict) -> dict:
        s, root = item["suspect"], self.root
        return {"id": item["id"], "name": relative(s.path, root) if not s.new else s.path.name, "new": s.new,
                "given": s.given, "label": item["label"], "suggested": s.suggested, "score": s.score,
                "probabilities": s.probabilities, "reasons": s.reasons, "readable": s.suggested is not None,
                "decision": item["decisions"][-1] if item["decisions"] else None,
                "neighbours": [{"name": relative(p, root), "label": label, "similarity": round(similarity, 4)}
                               for p, label, similarity in s.neighbours]}

    def progress(self) -> dict:
        """How many items have a decision, and how many new photos each class has received (the labelling loop's
        balance)."""
        added = {name: sum(item["new"] and item["label"] == name for item in self.items) for name in self.names}
        return {"reviewed": sum(bool(item["decisions"]) for item in self.items), "total": len(self.items),
                "added": added}

    def item_of(self, number: int) -> dict:
        if not 0 <= number < len(self.items):
            raise HTTPException(404, f"no suspect {number}: there are {len(self.items)}")
        return self.items[number]

    def send(self, path: Path) -> FileResponse:
        real = self.allowed.get(str(path))
        if real is None or os.path.realpath(path) != real or not os.path.isfile(real):
            raise HTTPException(403, f"{path.name}: not a file of the data set")
        return FileResponse(real)

    def decide(self, item: dict, body: DecisionBody):
        """POST /api/decision's work, under the lock: the decision written to the data set's files."""
        store = self.store
        try:
            if item["key"] is None:  # a new photo: keep takes the suggestion, exclude leaves it out
                if body.against is not None:
                    raise Conflict(f"{item['photo'].name}: not in the data set yet", None)
                if body.action == "exclude":
                    record = store.note(item["photo"], "skip", by=body.client)
                else:
                    label = body.label if body.action == "set" else item["suspect"].suggested
                    record = store.add(item["photo"], label, by=body.client)
                    item["key"] = record["file"]
            else:
                record = store.decide(item["key"], body.action, label=body.label, against=body.against,
                                      by=body.client)
        except Conflict as error:
            if item["key"] is not None:
                item["label"] = store.label(item["key"])
            return JSONResponse({"detail": str(error), "current": error.current, "item": self.public(item)},
                                status_code=409)
        except DataError as error:
            raise HTTPException(422, str(error)) from None
        self.refresh(item)
        item["decisions"].append(record["action"])
        return {"item": self.public(item), **self.progress()}

    def undo(self, body: UndoBody):
        """POST /api/undo's work, under the lock: the client's last decision taken back."""
        try:
            record = self.store.undo(by=body.client)
        except Conflict as error:
            return JSONResponse({"detail": str(error), "current": error.current}, status_code=409)
        except DataError as error:
            raise HTTPException(404, str(error)) from None
        item = next((i for i in self.items if i["key"] == record["file"] or str(i["photo"]) == record["file"]
                     or str(i["photo"]) == record.get("photo")), None)
        if item is not None:
            if record["action"] == "add":  # the photo is new again: no entry, no label
                item["key"], item["photo"] = None, item["suspect"].path
            self.refresh(item)
            if item["decisions"]:
                item["decisions"].pop()
        return {"undone": {k: record[k] for k in ("file", "action", "before", "after")},
                "item": self.public(item) if item else None, **self.progress()}

    def refresh(self, item: dict) -> None:
        """The item's label and file as they are now (a class-folder decision moves the file)."""
        if item["key"] is None:
            item["label"] = None
            return
        item["label"] = self.store.label(item["key"])
        now = self.store.path(item["key"])
        if now is not None and str(now) != str(item["photo"]):
            item["photo"] = now
            self.allowed[str(now)] = os.path.realpath(now)


def create_review_app(review: Review, out: str | os.PathLike = "review") -> FastAPI:
    """The review app over `review`'s suspects; decisions are written to review.data_path, logged in `out`."""
    session = ReviewSession(review, LabelStore(review.data_path, out))
    names = session.names
    app = page_app("stopsign review", f"Review the labels of {review.data_path} ({', '.join(names)}).",
                   "review.html", default=MAX_BODY_BYTES, describe=too_large)

    @app.get("/api/suspects")
    def suspects() -> dict:
        with session.lock:
            return {"data": str(review.data_path), "layout": review.data.layout, "classes": names,
                    "folds": review.folds, "items": [session.public(item) for item in session.items],
                    **session.progress()}

    @app.get("/api/photo/{number}")
    def photo(number: int) -> FileResponse:
        return session.send(session.item_of(number)["photo"])

    @app.get("/api/photo/{number}/neighbour/{k}")
    def neighbour(number: int, k: int) -> FileResponse:
        nearest = session.item_of(number)["suspect"].neighbours
        if not 0 <= k < len(nearest):
            raise HTTPException(404, f"suspect {number} has {len(nearest)} neighbours")
        return session.send(nearest[k][0])

    @app.post("/api/decision")
    def decision(body: DecisionBody):
        item = session.item_of(body.id)
        if body.action == "set" and body.label not in names:
            raise HTTPException(422, f"unknown class {body.label!r}: the classes are {', '.join(names)}")
        with session.lock:
            return session.decide(item, body)

    @app.post("/api/undo")
    def undo(body: UndoBody):
        with session.lock:
            return session.undo(body)

    return app
