"""`python -m fr_jax.serve --model DIR`: the JAX rollout engine behind SGLang's native HTTP protocol.

Flags keep SGLang's launch_server names where one exists (--model-path, --port, --tp-size, --context-length,
--max-running-requests, --max-queued-requests, --chunked-prefill-size, --num-continuous-decode-steps,
--disable-radix-cache, --weight-version, --served-model-name, --random-seed), so the trainer can start either
server with the same arguments. --model also takes the demo name "smollm2".
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

import uvicorn

from fr_jax import cli
from fr_jax.config import ConfigError
from fr_jax.parallel.mesh import initialize_distributed, make_mesh

_log = logging.getLogger("fr_jax.serve")


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.parser("python -m fr_jax.serve", __doc__)
    p.add_argument(
        "--model",
        "--model-path",
        dest="model",
        required=True,
        help="HF model directory (config.json + safetensors + tokenizer), or 'smollm2'",
    )
    p.add_argument("--tokenizer-path", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default float32)")
    p.add_argument(
        "--param-dtype", choices=("float32", "bfloat16"), default=None, help="stored parameter dtype (default float32)"
    )
    p.add_argument("--mesh", default="1,1,-1", help="data,fsdp,tensor axis sizes (-1: the rest); default all tensor")
    p.add_argument(
        "--tp-size", type=int, default=None, help="tensor-parallel size (SGLang's flag; sets the mesh to 1,-1,TP)"
    )
    p.add_argument("--context-length", type=int, default=None, help="prompt + output token limit")
    p.add_argument("--max-running-requests", type=int, default=64, help="decode slots (samples decoding at once)")
    p.add_argument(
        "--max-queued-requests", type=int, default=None, help="waiting samples beyond which requests get 503"
    )
    p.add_argument("--chunked-prefill-size", type=int, default=512, help="prompt tokens prefilled per step")
    p.add_argument("--num-continuous-decode-steps", type=int, default=4, help="decode steps between scheduling rounds")
    p.add_argument("--prefix-cache-tokens", type=int, default=8192, help="K/V pool of the prefix cache, in tokens")
    p.add_argument("--disable-radix-cache", action="store_true", help="no prefix cache")
    p.add_argument(
        "--scheduling",
        choices=("continuous", "static"),
        default="continuous",
        help="continuous batching, or static batches (the baseline)",
    )
    p.add_argument("--weight-version", default="default")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--random-seed", type=int, default=0, help="seeds requests that give no sampling_seed")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def main(argv=None) -> int:
    return cli.run(serve, parse_args(argv))


def serve(args: argparse.Namespace) -> int:
    logging.getLogger().setLevel(args.log_level.upper())
    initialize_distributed()
    from fr_jax.rollout.server import RolloutServer, create_app  # after logging: loading logs progress

    model_dir = args.model
    if model_dir == "smollm2":
        from fr_jax.models.gguf import smollm2_hf_dir

        model_dir = str(smollm2_hf_dir())
    if not (pathlib.Path(model_dir) / "config.json").is_file():
        raise ConfigError(f"--model {args.model}: not an HF model directory (no config.json there) nor 'smollm2'")
    try:
        data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    except ValueError:
        raise ConfigError(f"--mesh {args.mesh!r}: expected three integers data,fsdp,tensor") from None
    if args.tp_size is not None:
        data, fsdp, tensor = 1, -1, args.tp_size
    mesh = make_mesh(data, fsdp, tensor)
    server = RolloutServer.from_pretrained(
        model_dir,
        mesh=mesh,
        tokenizer_path=args.tokenizer_path,
        param_dtype=args.param_dtype,
        dtype=args.dtype,
        context_length=args.context_length,
        max_running_requests=args.max_running_requests,
        max_queued_requests=args.max_queued_requests,
        chunked_prefill_size=args.chunked_prefill_size,
        chunk_steps=args.num_continuous_decode_steps,
        prefix_cache_tokens=0 if args.disable_radix_cache else args.prefix_cache_tokens,
        scheduling=args.scheduling,
        seed=args.random_seed,
        served_model_name=args.served_model_name,
        weight_version=args.weight_version,
    )
    info = server.server_info()
    _log.info(
        "serving %s (weights %s) on mesh %s: %s scheduling, max_running_requests %d, prefix cache %d tokens",
        model_dir,
        info["weight_version"],
        info["mesh"],
        info["schedule_policy"],
        info["max_running_requests"],
        info["prefix_cache_tokens"],
    )
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
