"""`medmvl serve`: run the local inference worker (HTTP API, see medmvl_core.worker.app)."""

from __future__ import annotations

import argparse

NAME = "serve"
HELP = "run the inference worker (HTTP API for the Slicer module, the viewer and `medmvl ask`)"
EXAMPLES = ("medmvl serve --checkpoint Resources/demo_model --token-file ~/.medmvl-token --port 8765",)
DOCS = "docs/api.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model folder (ours or MedM-VL's)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu (default auto)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                        help="weights dtype (default bf16/fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--quantize", choices=["auto", "none", "int8", "8bit", "4bit"], default="auto",
                        help="auto (default): torch dynamic int8 on a CPU, none on a GPU; int8: CPU only; "
                             "8bit/4bit: bitsandbytes")
    parser.add_argument("--host", default=None,
                        help="address to bind (default 127.0.0.1; another address exposes the "
                             "worker on the network and requires --token-file)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port)")
    parser.add_argument("--token-file", default=None,
                        help="file holding the access token (created with a random token if "
                             "missing); the port and URL are written to FILE.json")
    parser.add_argument("--max-queue", type=int, default=8,
                        help="questions that may wait for the GPU (more get HTTP 429)")
    parser.add_argument("--max-upload-mb", type=float, default=1024.0,
                        help="largest array upload (bigger ones get HTTP 413 before being read)")
    parser.add_argument("--volume-store-mb", type=float, default=4096.0,
                        help="memory for uploaded arrays (LRU; sessions on an evicted volume "
                             "answer 410 volume_evicted)")
    parser.add_argument("--max-sessions", type=int, default=256,
                        help="open conversations; past it the least recently used idle one is "
                             "closed (it answers 410 session_evicted)")
    parser.add_argument("--upload-buffer-mb", type=float, default=2048.0,
                        help="upload bodies received at the same time, in total (one upload is "
                             "always admitted; more get HTTP 429)")
    parser.add_argument("--body-timeout", type=float, default=30.0,
                        help="seconds a request body may stall before HTTP 408")
    parser.add_argument("--ssl-certfile", default=None,
                        help="serve HTTPS with this certificate (PEM; with --ssl-keyfile)")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="shut down when this process exits (set by the launcher of the "
                             "viewer, the Slicer module and `medmvl ask`)")
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="seconds one answer may take, queue wait included")
    parser.add_argument("--cache-mb", type=float, default=2048.0,
                        help="budget for preprocessed images + encoder outputs")
    parser.add_argument("--kv-cache-mb", type=float, default=4096.0,
                        help="budget for all sessions' KV caches (LRU)")
    parser.add_argument("--max-batch", type=int, default=4,
                        help="questions waiting together are decoded in one batch (1 = off)")
    parser.add_argument("--decode", choices=["auto", "plain", "static"], default="auto",
                        help="decode path: static = preallocated KV cache (auto: on CUDA), "
                             "falls back to plain on any failure")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the static decode step (CUDA graphs; experimental)")


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    import tempfile
    from pathlib import Path

    from medmvl_core.client.launcher import ready_file_for
    from medmvl_core.errors import ConfigError
    from medmvl_core.worker.settings import WorkerSettings, is_loopback, read_or_create_token

    if not Path(args.checkpoint).is_dir():
        raise ConfigError(f"checkpoint folder {args.checkpoint!r} does not exist")
    host = args.host or "127.0.0.1"
    if not is_loopback(host) and not args.token_file:
        raise ConfigError(f"--host {host} exposes the worker beyond this machine: give "
                          "--token-file FILE (the token clients must send)")
    if args.token_file:
        token_file = Path(args.token_file)
    else:
        token_file = Path(tempfile.mkdtemp(prefix="medmvl-worker-")) / "token"
    token = read_or_create_token(token_file)
    settings = WorkerSettings(
        token=token, max_queue=args.max_queue,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
        request_timeout_s=args.request_timeout, model_name=Path(args.checkpoint).name,
        max_batch=args.max_batch, volume_store_bytes=int(args.volume_store_mb * (1 << 20)),
        max_sessions=args.max_sessions, body_timeout_s=args.body_timeout,
        upload_buffer_bytes=int(args.upload_buffer_mb * (1 << 20)))
    for name, value in (("--max-sessions", args.max_sessions), ("--body-timeout", args.body_timeout),
                        ("--upload-buffer-mb", args.upload_buffer_mb),
                        ("--max-upload-mb", args.max_upload_mb),
                        ("--volume-store-mb", args.volume_store_mb)):
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}")

    def loader():
        from medmvl_core.client.model_identity import read_model_identity
        # name, hash and intended use for /v1/health (hashing runs here, off the request path)
        settings.model_info = read_model_identity(args.checkpoint).to_dict()
        return load_engine(args.checkpoint, args.device, args.dtype, args.quantize,
                           warmup_batch=args.max_batch,
                           cache_bytes=int(args.cache_mb * (1 << 20)),
                           kv_cache_bytes=int(args.kv_cache_mb * (1 << 20)),
                           max_new_tokens_limit=settings.max_new_tokens,
                           decode_mode=args.decode, compile_decode=args.compile)

    from medmvl_core.worker.loading import load_engine
    from medmvl_core.worker.server import WorkerServer

    level = "info" if logging.getLogger().level <= logging.INFO else "warning"
    server = WorkerServer(settings, host=host, port=args.port, loader=loader,
                          ready_file=ready_file_for(token_file), log_level=level,
                          ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                          parent_pid=args.parent_pid)
    print(f"medmvl worker ready on {server.url} (pid {os.getpid()}); token in {token_file}; "
          f"port file {ready_file_for(token_file)}; the model loads in the background "
          f"(GET /v1/health says when)", flush=True)
    server.run()
    return 0
