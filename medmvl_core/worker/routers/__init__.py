"""One router per resource: health, volumes, sessions, messages (wired in ``worker.app``)."""
