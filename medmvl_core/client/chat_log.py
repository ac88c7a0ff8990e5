"""The panel controller's chat bookkeeping: each volume's visible history, its conversation
records, restoring a stored one, clearing, the transcript (:class:`ChatLogMixin`, a base of
:class:`~medmvl_core.client.controller.PanelController`, whose ``__init__`` sets the state it uses).
Standard library only.
"""

from __future__ import annotations

import logging
from typing import Any

from medmvl_core.client import errors, records
from medmvl_core.client.client import Answer, WorkerClient
from medmvl_core.client.model_identity import ModelIdentity
from medmvl_core.client.panel_types import ChatEntry, shown_question

logger = logging.getLogger(__name__)


class ChatLogMixin:
    """History, records and transcript of each volume's conversation (keyed by the view's key)."""

    # Set by PanelController.__init__ (declared here for readers and type checkers).
    runner: Any
    client: WorkerClient | None
    health: dict
    histories: dict[str, list[ChatEntry]]
    conversations: dict[str, records.Conversation]
    _uploads: dict
    _session: str | None
    _partial: dict[str, str]
    _pending: dict[str, dict]

    def history(self, key: str) -> list[ChatEntry]:
        return list(self.histories.get(key, []))

    def model_identity(self) -> ModelIdentity:
        """The connected model's name, revision/hash and intended use (from health)."""
        return ModelIdentity.from_health(self.health)

    def _record(self, key: str, ans: Answer) -> None:
        p = self._pending.pop(key, None)
        conv = self.conversations.get(key)
        if p is None or conv is None:
            return
        status = "cancelled" if ans.finish_reason == "cancelled" else "answered"
        conv.turns.append(records.Turn(
            task=p["task"], question=p["question"], answer=ans.text, model=self.model_identity(),
            generation={**p["generation"].to_dict(), "finish_reason": ans.finish_reason,
                        "num_tokens": ans.num_tokens},
            asked_at=p["asked_at"], answered_at=records.now_iso(), region=p["region"],
            boxes=records.found_boxes(ans.boxes, p["label"]), status=status))

    def restore(self, key: str, conversation: records.Conversation) -> None:
        """Show a stored conversation (e.g. from a loaded scene) as the volume's history.
        The worker does not see restored turns: the next question starts a new session."""
        self.conversations[key] = conversation
        entries: list[ChatEntry] = []
        for t in conversation.turns:
            box = t.region.voxel if t.region is not None else None
            label = t.region.label if t.region is not None else ""
            entries.append(ChatEntry("user", shown_question(t.task, t.question, box, label), t.task))
            entries.append(ChatEntry("assistant", t.answer, t.task,
                                     [{"voxel": b.voxel, "model": b.model,
                                       "physical_lps": b.physical_lps} for b in t.boxes]))
        self.histories[key] = entries

    def clear_history(self, key: str) -> None:
        """Forget the volume's conversation here and on the worker: the next question starts a
        new worker session (the uploaded volume is kept), so the model no longer sees the
        cleared turns and they stop taking room in its context."""
        self.histories.pop(key, None)
        self.conversations.pop(key, None)
        cached = self._uploads.get(key)
        if cached is not None:
            self._uploads[key] = (cached[0], cached[1], None)
            old, client = cached[2], self.client
            # Free the old conversation on the worker now (its KV cache and turns), in the
            # background so the panel never waits on the network. Not while it is answering: that
            # answer finishes (or is cancelled) first and the worker's idle eviction frees it.
            if old is not None and client is not None and old != self._session:
                self.runner.job(lambda: self._forget_session(client, old), "medmvl-forget").start()

    @staticmethod
    def _forget_session(client: WorkerClient, session_id: str) -> None:
        try:
            client.delete_session(session_id)
        except errors.WorkerError as exc:  # gone already (evicted, worker restarted): fine
            logger.info("delete of a cleared session: %s", exc)

    def transcript(self, key: str) -> str:
        """The volume's conversation as plain text (Copy / Save)."""
        names = {"user": "You", "assistant": "MedM-VL", "error": "Error"}
        return "\n\n".join(f"{names.get(e.role, e.role)}: {e.text}"
                           + ("" if e.in_context else "  (no longer in the model's context)")
                           for e in self.history(key))

    def partial(self, key: str) -> str:
        """The answer streamed so far (while busy)."""
        return self._partial.get(key, "")

    def _conversation_lost(self, key: str, exc: errors.SessionEvictedError) -> errors.WorkerError:
        """The worker closed the session (cap or volume eviction): never re-open one silently.
        Mark the visible turns as out of the model's context, forget the session (and, for an
        evicted volume, the upload), and return the error the panel shows."""
        for entry in self.histories.get(key, []):
            entry.in_context = False
        cached = self._uploads.get(key)
        if cached is not None:
            if exc.code == "volume_evicted":
                self._uploads.pop(key, None)
            else:
                self._uploads[key] = (cached[0], cached[1], None)
        return errors.SessionEvictedError(
            "The worker closed this conversation (" + ("its copy of the image was evicted"
            if exc.code == "volume_evicted" else "too many open sessions") + "): the turns above "
            "are no longer in the model's context. Ask again to start over with this image.",
            code=exc.code, status=exc.status)
