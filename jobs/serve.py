"""Serve the endogenous reward over HTTP with Ray Serve (and optionally a trained sentence RM).

    python -m jobs.serve                                   # the bundled model on 127.0.0.1:8000 until Ctrl-C
    python -m jobs.serve --http.port 8100 --sentence_rm runs/sentence_rm/final
    ray job submit --working-dir . -- python -m jobs.serve --config configs/serve_gpu.yaml   # GPUs; see that file
    serve run jobs.serve:build_app model.name=smollm2-135m-instruct replicas.cpus_per_replica=2

Routes: POST /v1/reward (EndoRL's protocol), POST /get_reward (OpenRLHF's remote reward protocol: point their
`--reward.remote_url` at http://HOST:PORT/get_reward), GET /health; Ray Serve's metrics on Ray's metrics port.
It binds 127.0.0.1 unless --http.host says otherwise; any other host needs a bearer token (--auth.token_file FILE
or --auth.token_env NAME: never the token itself on the command line).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
from typing import Literal

from actors.cluster import RayConfig, check_driver_device, init_ray, is_local, worker_env
from actors.reward_server import BatchingConfig, ReplicaConfig, reward_app
from pipeline.config import opt, parse_config, to_yaml
from pipeline.endogenous import EndoRewardConfig
from pipeline.models import ModelConfig, ModelNotFoundError, resolve_model
from pipeline.reward_api import AuthConfig, LimitsConfig, is_loopback, read_token, token_digest


@dataclasses.dataclass
class HttpConfig:
    host: str = opt("127.0.0.1", "address Serve's HTTP proxy binds; anything but loopback needs an auth token")
    port: int = opt(8000, "HTTP port (Serve's default)")
    proxy_location: Literal["EveryNode", "HeadOnly"] = opt(
        "EveryNode", "where Serve runs its HTTP proxies (Serve's default: every node, so any node's address serves)")


@dataclasses.dataclass
class ServeJobConfig:
    model: ModelConfig = opt(factory=ModelConfig)
    reward: EndoRewardConfig = opt(factory=EndoRewardConfig)
    sentence_rm: str = opt("", "a trained sentence RM (jobs.train_rm's storage/final) to serve next to the "
                               "endogenous reward: a folder every replica's node sees, or s3:// / gs://")
    openrlhf_reward: Literal["endogenous", "sentence_rm"] = opt("endogenous", "what /get_reward returns as `rewards`")
    http: HttpConfig = opt(factory=HttpConfig)
    auth: AuthConfig = opt(factory=AuthConfig)
    limits: LimitsConfig = opt(factory=LimitsConfig)
    batching: BatchingConfig = opt(factory=BatchingConfig)
    replicas: ReplicaConfig = opt(factory=ReplicaConfig)
    app_name: str = opt("endorl-reward", "the Serve application's name")
    detach: bool = opt(False, "deploy, print where it serves, and return (the app keeps running on the cluster: "
                              "for `ray job submit`); default: serve until Ctrl-C, then shut Serve down")
    ray: RayConfig = opt(factory=RayConfig)


def check_config(cfg: ServeJobConfig, host: str, environ: dict) -> str:
    """Every refusal that can be known before Ray starts; returns the bearer token ('' = none)."""
    try:
        token = read_token(cfg.auth, environ)
    except ValueError as e:
        raise SystemExit(str(e))
    if not token and not is_loopback(host):
        raise SystemExit(f"--http.host {host} serves beyond this machine, and no auth token is set. Fix: "
                         f"--auth.token_file FILE (its first line is the token) or --auth.token_env NAME, or bind "
                         f"127.0.0.1.")
    if cfg.limits.max_request_tokens > cfg.batching.max_batch_tokens:
        raise SystemExit(f"--limits.max_request_tokens {cfg.limits.max_request_tokens} is more than "
                         f"--batching.max_batch_tokens {cfg.batching.max_batch_tokens}: a request is batched whole. "
                         f"Fix: raise the batch or lower the request limit.")
    if cfg.openrlhf_reward == "sentence_rm" and not cfg.sentence_rm:
        raise SystemExit("--openrlhf_reward sentence_rm needs --sentence_rm DIR.")
    if cfg.replicas.max_replicas and not 1 <= cfg.replicas.min_replicas <= cfg.replicas.max_replicas:
        raise SystemExit(f"--replicas.min_replicas {cfg.replicas.min_replicas} must be in 1..--replicas.max_replicas "
                         f"{cfg.replicas.max_replicas}.")
    return token


def make_app(cfg: ServeJobConfig, token: str, replica_cpus: float):
    return reward_app(cfg.model, cfg.reward, cfg.limits, cfg.batching, cfg.replicas, replica_cpus,
                      worker_env(cfg.ray, cfg.model.device), cfg.sentence_rm, cfg.openrlhf_reward, token_digest(token))


def build_app(args: dict):
    """`serve run jobs.serve:build_app key=value ...`: the same config, as dotted keys. Serve's own HTTP options
    apply there (127.0.0.1:8000 unless RAY_SERVE_DEFAULT_HTTP_HOST says otherwise), not --http.*."""
    argv = [f"--{key}={value}" for key, value in args.items()]
    cfg = parse_config(ServeJobConfig, argv, __doc__, prog="serve run jobs.serve:build_app")
    token = check_config(cfg, os.environ.get("RAY_SERVE_DEFAULT_HTTP_HOST") or "127.0.0.1", os.environ)
    return make_app(cfg, token, cfg.replicas.cpus_per_replica or 1)


def replica_cpus(cfg: ServeJobConfig) -> float:
    """CPUs (= torch threads) of one replica: configured, else the largest node's CPUs shared by the replicas."""
    from actors.placement import node_resources

    largest = max((node.get("CPU", 0.0) for node in node_resources()), default=1.0)
    return cfg.replicas.cpus_per_replica or max(1.0, largest // max(cfg.replicas.replicas, cfg.replicas.max_replicas, 1))


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise SystemExit(f"--http.port {port}: cannot bind {host}:{port} ({e.strerror}). Fix: pick a free port, "
                             f"e.g. --http.port {port + 1}.") from None


def metrics_urls() -> str:
    """Where Ray exports its metrics (Serve's among them) in Prometheus format: one port per node."""
    import ray

    return ", ".join(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
                     for node in ray.nodes() if node["Alive"])


def main(argv: list[str] | None = None) -> str:
    from ray import serve

    cfg = parse_config(ServeJobConfig, argv, __doc__)
    print(to_yaml(cfg))
    token = check_config(cfg, cfg.http.host, os.environ)
    check_driver_device(cfg.ray, cfg.model.device)
    local = is_local(cfg.ray)
    if local:  # on a cluster each replica resolves the model on its own node
        try:
            resolve_model(cfg.model.name, cfg.model.cache_dir)
        except ModelNotFoundError as e:
            raise SystemExit(f"--model.name: {e}")
        check_port_free(cfg.http.host, cfg.http.port)
    init_ray(cfg.ray, cfg.model.device)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops it like Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even where it started ignored (`&` in a script)
    url = f"http://{cfg.http.host}:{cfg.http.port}"
    try:
        serve.start(proxy_location=cfg.http.proxy_location,
                    http_options={"host": cfg.http.host, "port": cfg.http.port,
                                  "request_timeout_s": cfg.limits.request_timeout_s + 30})  # a backstop behind ours
        try:
            serve.run(make_app(cfg, token, replica_cpus(cfg)), name=cfg.app_name, route_prefix="/")
        except RuntimeError as e:
            raise SystemExit(f"the reward server did not start: {e}")
        print(f"serving the reward at {url}: POST /v1/reward, POST /get_reward (OpenRLHF: --reward.remote_url "
              f"{url}/get_reward), GET /health; Ray Serve metrics (Prometheus): {metrics_urls()}", flush=True)
        if cfg.detach:
            return url
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the reward server", flush=True)
    serve.shutdown()
    if local:
        import ray
        ray.shutdown()
    return url


if __name__ == "__main__":
    main()
