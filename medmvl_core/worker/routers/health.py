"""GET /v1/health: status, model, device, memory by owner, queue, sessions."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from medmvl_core import __version__
from medmvl_core.client.protocol import API_VERSION
from medmvl_core.worker.deps import get_state, require_token
from medmvl_core.worker.models import ERROR_RESPONSES, HealthOut
from medmvl_core.worker.state import WorkerState

router = APIRouter(tags=["health"], dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)


def memory_report(state: WorkerState) -> dict[str, Any]:
    """Bytes held per owner: the volume store (and its budget), the engine's caches, the device."""
    out: dict[str, Any] = {"volumes_bytes": state.volumes.used_bytes,
                           "volume_store_budget_bytes": state.volumes.budget_bytes,
                           "volumes": len(state.volumes)}
    eng = state.engine
    if eng is not None:
        out["image_cache_bytes"] = eng.images.used_bytes
        out["kv_cache_bytes"] = eng.kv_bytes_used()
        from medmvl_core.worker.admission import kv_report
        out.update(kv_report(eng))  # budget in tokens at the loaded model's real per-token size
        if eng.device.type == "cuda":
            import torch
            out["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(eng.device))
            out["cuda_reserved_bytes"] = int(torch.cuda.memory_reserved(eng.device))
    try:
        import resource
        out["max_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        pass
    return out


@router.get("/health", response_model=HealthOut)
async def health(state: WorkerState = Depends(get_state)) -> dict[str, Any]:
    eng = state.engine
    return {"status": state.status, "model": state.settings.model_name,
            "model_info": state.settings.model_info, "device": state.device,
            "memory": memory_report(state), "version": __version__, "api": API_VERSION,
            "error": state.error, "queue_waiting": state.queue.waiting,
            "busy": state.queue.running is not None, "kinds": list(getattr(eng, "kinds", ())),
            "sessions": len(eng.sessions) if eng is not None else 0,
            "max_sessions": state.settings.max_sessions}
