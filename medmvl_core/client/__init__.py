"""Slicer-free client of the MedM-VL worker: standard library + numpy only (never torch).

```python
from medmvl_core.client import WorkerClient, WorkerLauncher, errors
launcher = WorkerLauncher(python="/path/to/python", checkpoint="ckpt/")
client = launcher.start()
vid = client.upload_volume(array, spacing, origin, direction, modality="CT")
sid = client.create_session(vid)
ans = client.ask(sid, question="Is there a nodule?", on_token=print)
```
"""

from medmvl_core.client import errors
from medmvl_core.client.client import TASKS, Answer, WorkerClient
from medmvl_core.client.launcher import WorkerLauncher, ready_file_for

__all__ = ["Answer", "TASKS", "WorkerClient", "WorkerLauncher", "errors", "ready_file_for"]
