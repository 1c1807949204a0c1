"""RLHF with the endogenous reward of a frozen base model, on Ray.

    python -m jobs.rlhf --config configs/local.yaml              # local debug mode: embedded Ray, CPU
    ray job submit --working-dir . -- python -m jobs.rlhf --config configs/gpu.yaml --storage s3://BUCKET/runs/NAME

vLLM engines sample, the frozen base model scores (endogenous reward + reference log-probs in one pass),
DeepSpeed learners update the policy, and the new weights go back into the engines every step.
Writes TensorBoard logs, metrics.jsonl, nodes.json (which node ran which actor), precision.json (the dtype each
actor resolved: dtype auto picks bf16 where the hardware has it natively), checkpoints, curves.png and logs/ to
--storage (a folder; on a cluster an absolute path every node mounts, or s3:// / gs://); --resume continues from
the newest complete checkpoint there. The terminal shows the config, one progress bar and a summary (and errors);
the libraries' warnings and info lines go to STORAGE/logs/driver.log, each actor's output to STORAGE/logs/ROLE_I.log.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Literal

from actors.cluster import RayConfig, check_driver_device, init_ray, is_local, save_actor_logs
from actors.placement import PlacementConfig
from pipeline.config import opt, parse_config, to_dict, to_yaml
from pipeline.console import LogFile, summary
from pipeline.data import builtin_prompts, load_prompts, split_prompts
from pipeline.driver import rl_loop, tokenize_prompts
from pipeline.remote_reward import RLRewardConfig
from pipeline.reward_api import AuthConfig, read_token
from pipeline.experience import AdvantageConfig
from pipeline.export import FINAL, ExportError, export_policy
from pipeline.faults import Failure, FaultsConfig, LearnerGroupFailed, check_faults
from pipeline.models import ModelConfig, open_model
from pipeline.policy import LearnerConfig
from pipeline.precision import DType, summarize
from pipeline.rollout import RolloutConfig
from pipeline.resume import check_resume_config
from pipeline.runlog import CHECKPOINTS, LOGGERS, MARKER, RunLog, WandbConfig, check_loggers, latest_checkpoint, plot_curves
from pipeline.sentence_rm import CONFIG_FILE
from pipeline.storage import Storage, check_location
from pipeline.weight_sync import SyncConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RLConfig:
    local: bool = opt(False, "local debug mode: an embedded single-node Ray, even if RAY_ADDRESS is set")
    prompts: str = opt("builtin", "'builtin', or a prompts/pairs file (.jsonl/.parquet/.json) or HF dataset name")
    heldout_fraction: float = opt(0.125, "share of prompts held out to measure the reward of the policy")
    heldout_samples: int = opt(4, "samples per held-out prompt at each evaluation (same seed every time)")
    steps: int = opt(20, "RL iterations")
    prompts_per_step: int = opt(8, "prompts per iteration (each sampled rollout.n_samples times)")
    seed: int = opt(0, "seed of the prompt order and the sampling")
    storage: str = opt("runs/rlhf", "the run's folder: tensorboard/, metrics.jsonl, nodes.json, logs/, checkpoints/ (every "
                                    "learner rank writes its shard here), curves.png, config.yaml. A local folder in "
                                    "local mode; on a cluster an absolute path every node mounts, or s3:// / gs://")
    resume: bool = opt(False, "continue from the newest complete checkpoint in --storage (a torn newest one is "
                              "skipped with a message); refused if the config differs from the checkpoint's in "
                              "what the run computes, unless --resume_force names the fields")
    resume_force: list[str] = opt(help="with --resume: dotted config fields allowed to differ from the checkpoint's, "
                                       "e.g. steps,rollout.engines (the change is then intended)", factory=list)
    max_failures: int = opt(1, "learner-group failures (a rank died) survived by restarting every actor from the "
                               "newest complete checkpoint, in this job; then the run stops")
    wait_timeout_s: float = opt(1800, "longest the driver waits for one phase (rollout, score, experience, sync, "
                                      "evaluation, actor start): then a TimeoutError naming the phase, not a hang")
    checkpoint_every: int = opt(10, "save a checkpoint every K steps (and at the end); 0 = never")
    export: bool = opt(True, "at the end, write the trained policy to STORAGE/final_policy as a Hugging Face model "
                             "folder (safetensors, tokenizer, generation config; transformers and vLLM load it as is), "
                             "from the last step's checkpoint (one is saved then if --checkpoint_every 0). Later: "
                             "python -m jobs.export STORAGE")
    loggers: list[str] = opt(help=f"where the metrics go besides metrics.jsonl: a comma-separated list of "
                                  f"{', '.join(LOGGERS)} (wandb: offline under STORAGE/wandb unless --wandb.mode online)",
                             factory=lambda: ["tensorboard"])
    wandb: WandbConfig = opt(factory=WandbConfig)
    eval_every: int = opt(5, "held-out reward every K steps (and before the first step); 0 = never")
    sync: SyncConfig = opt(factory=SyncConfig)
    sync_check_every: int = opt(5, "compare engine vs learner log-probs after the sync every K steps; 0 = never")
    sync_tolerance: float = opt(0.0, "max |log-prob diff| the sync check accepts; 0 = 1e-3 when engine and learners "
                                     "resolved float32, else 0.5 (bf16 kernels alone differ by ~0.2: only gross "
                                     "failures show)")
    rollout_dtype: DType = opt("auto", "vLLM engine precision; auto: bfloat16 on a GPU or a CPU with avx512_bf16/"
                                       "amx_bf16, else float32, resolved on each engine's node (fp16: not on CPU)")
    scorers: int = opt(1, "frozen base-model actors (endogenous reward + reference log-probs)")
    scorer_cpus: float = opt(1, "CPUs per base-model actor")
    scorer_gpus: float = opt(0, "GPUs per base-model actor (0 with --model.device cuda = 1)")
    scorer_resources: dict[str, float] = opt(help="custom Ray resources each base-model actor needs (pins it to a "
                                                  "node type)", factory=dict)
    sentence_rm: str = opt("", "trained sentence RM (jobs.train_rm's storage/final), used when "
                               "advantage.sentence_rm_weight != 0: a folder (on a cluster: on storage every node "
                               "mounts, read by the RM actor on its node) or an s3:// / gs:// URI")
    sentence_rm_cpus: float = opt(1, "CPUs of the sentence-RM actor")
    sentence_rm_gpus: float = opt(0, "GPUs of the sentence-RM actor (0 with --model.device cuda = 1)")
    sentence_rm_resources: dict[str, float] = opt(help="custom Ray resources of the sentence-RM actor", factory=dict)
    placement: PlacementConfig = opt(factory=PlacementConfig)
    faults: FaultsConfig = opt(factory=FaultsConfig)  # recovery options, and --faults.kill (a testing hook)
    model: ModelConfig = opt(factory=ModelConfig)
    reward: RLRewardConfig = opt(factory=RLRewardConfig)  # the endogenous reward's options + --reward.remote_url
    advantage: AdvantageConfig = opt(factory=AdvantageConfig)
    rollout: RolloutConfig = opt(factory=RolloutConfig)
    learner: LearnerConfig = opt(factory=LearnerConfig)
    ray: RayConfig = opt(factory=lambda: RayConfig(log_to_driver=False))  # actors' output: STORAGE/logs/, not the terminal


def check_config(cfg: RLConfig, prompt_count: int, heldout_count: int, local: bool) -> None:
    """Every refusal that can be known before a single actor starts. On a cluster the driver's own devices say
    nothing (it runs on a CPU head node): a cuda run there waits for GPU nodes when its actors are placed."""
    check_driver_device(cfg.ray, cfg.model.device)
    try:
        check_location(cfg.storage, "--storage", cluster=not local)
    except ValueError as e:
        raise SystemExit(str(e))
    try:
        check_loggers(cfg.loggers)
    except ValueError as e:
        raise SystemExit(str(e))
    try:
        check_faults(cfg.faults, {"rollout_engines": cfg.rollout.min_engines, "scorers": cfg.scorers,
                                  "policy_learners": cfg.learner.ranks}, cfg.steps)
    except ValueError as e:
        raise SystemExit(str(e))
    if prompt_count == 0:
        raise SystemExit(f"--prompts {cfg.prompts!r} gave zero prompts. Fix: point it at a file with a `prompt` column.")
    if cfg.advantage.estimator in ("grpo", "rloo") and cfg.rollout.n_samples < 2:
        raise SystemExit(f"--advantage.estimator {cfg.advantage.estimator} needs at least 2 samples per prompt, "
                         f"got --rollout.n_samples {cfg.rollout.n_samples}. Fix: --rollout.n_samples 4")
    if cfg.eval_every and heldout_count == 0:
        raise SystemExit("no held-out prompts to measure the reward on. Fix: --heldout_fraction 0.125, or --eval_every 0.")
    if cfg.prompts_per_step > prompt_count:
        raise SystemExit(f"--prompts_per_step {cfg.prompts_per_step} is more than the {prompt_count} training prompts. "
                         f"Fix: lower it or give more prompts.")
    if cfg.reward.remote_url:  # the remote-reward actor reads the token on its node; check here it can be read
        try:
            read_token(AuthConfig(cfg.reward.remote_token_file, cfg.reward.remote_token_env), os.environ)
        except ValueError as e:
            raise SystemExit(str(e).replace("auth.token_", "--reward.remote_token_"))
    if cfg.advantage.sentence_rm_weight and not (cfg.sentence_rm and Storage(cfg.sentence_rm).exists(CONFIG_FILE)):
        raise SystemExit(f"--advantage.sentence_rm_weight {cfg.advantage.sentence_rm_weight} needs a trained sentence RM, "
                         f"but --sentence_rm {cfg.sentence_rm!r} holds no {CONFIG_FILE} (as seen from the driver). "
                         f"Fix: train one with jobs.train_rm and pass its final folder, on storage every node mounts.")


def check_resume(cfg: RLConfig, checkpoint: str, implied: list[str]) -> None:
    """Before any actor starts: the new config against the one saved with the checkpoint (pipeline/resume.py)."""
    storage = Storage(cfg.storage)
    if not storage.exists(f"{checkpoint}/config.yaml"):
        print(f"--resume: {storage.location_of(checkpoint)} holds no config.yaml; the config is not compared", flush=True)
        return
    forced = check_resume_config(storage.read_text(f"{checkpoint}/config.yaml"), to_dict(cfg), cfg.resume_force + implied,
                                 storage.location_of(checkpoint))
    if forced:
        print(f"--resume: continuing with the intended changes to {', '.join(forced)} (--resume_force)", flush=True)


def main(argv: list[str] | None = None) -> str:
    """Terminal: the config, one progress bar, a summary, and errors; the rest goes to STORAGE/logs/."""
    started = time.perf_counter()
    cfg = parse_config(RLConfig, argv, __doc__)
    if cfg.local:
        cfg.ray.address = "local"
    local = is_local(cfg.ray)
    print(to_yaml(cfg))
    try:
        prompts = builtin_prompts() if cfg.prompts == "builtin" else load_prompts(cfg.prompts)
        train_prompts, heldout_prompts = split_prompts(prompts, cfg.heldout_fraction, cfg.seed)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--prompts: {e}")
    check_config(cfg, train_prompts.num_rows, heldout_prompts.num_rows, local)
    console = LogFile(cfg.storage)  # from here the libraries' warnings and info lines go to STORAGE/logs/driver.log
    if cfg.export:
        console.preload("deepspeed")  # the export merges the ZeRO shards with DeepSpeed, in this process
    try:
        history = run(cfg, train_prompts, heldout_prompts)
        with console.capture():  # the export loads and merges with libraries that print as they go
            exported = export_final(cfg) if cfg.export else ""
    finally:
        console.close()
    print(summary(history, time.perf_counter() - started, Storage(cfg.storage), exported, cfg.loggers), flush=True)
    return cfg.storage


def run(cfg: RLConfig, train_prompts, heldout_prompts) -> list[dict]:
    """The run after its config checks, up to its last checkpoint; returns the metric rows."""
    _, tokenizer, window = open_model(cfg.model)  # the driver needs the tokenizer; actors resolve the model themselves
    cfg.rollout.check_fits(window)
    try:
        train_ids = tokenize_prompts(train_prompts, tokenizer, cfg.reward, cfg.rollout.max_prompt_tokens)
        heldout_ids = tokenize_prompts(heldout_prompts, tokenizer, cfg.reward, cfg.rollout.max_prompt_tokens)
    except ValueError as e:
        raise SystemExit(f"--prompts: {e}")
    resume = latest_checkpoint(cfg.storage) if cfg.resume else None
    if cfg.resume and resume is None:
        raise SystemExit(f"--resume: no complete checkpoint under {cfg.storage}/checkpoints. Fix: drop --resume or fix --storage.")
    derived_total_steps = not cfg.learner.total_steps
    cfg.learner.total_steps = cfg.learner.total_steps or cfg.steps * cfg.learner.ppo_epochs
    if resume:
        # a total_steps left to follow steps x ppo_epochs changes with them: forcing those forces it too
        implied = ["learner.total_steps"] if derived_total_steps and {"steps", "learner.ppo_epochs"} & set(cfg.resume_force) else []
        check_resume(cfg, resume[0], implied)

    init_ray(cfg.ray, cfg.model.device)
    restarts, restart = 0, None  # restart: (the Failure of the learner group restarted from, when it was noticed)
    while True:  # a dead learner rank takes its group down: restart every actor from the newest checkpoint
        try:
            log = session(cfg, train_ids, heldout_ids, resume[0] if resume else None, restart)
            break
        except LearnerGroupFailed as e:
            if restarts >= cfg.max_failures:
                raise SystemExit(f"{e}. Stopped after {cfg.max_failures} restart(s) (--max_failures).") from None
            restarts += 1
            resume = latest_checkpoint(cfg.storage)
            where = f"checkpoint step {resume[1]}" if resume else "the start (no complete checkpoint yet)"
            message = f"{e}; restarting all actors from {where} (restart {restarts} of --max_failures {cfg.max_failures})"
            logger.warning(message)
            print(message, file=sys.stderr, flush=True)
            redone = (e.step - (resume[1] if resume else 0) + 1) * cfg.prompts_per_step * cfg.rollout.n_samples
            restart = Failure(e.actor, e.step, e.phase, e.cause, 0.0, redone, f"all actors, from {where}"), \
                time.perf_counter()
    history = log.history()
    plot_curves(history, log.storage)
    return history


def session(cfg: RLConfig, train_ids, heldout_ids, checkpoint: str | None,
            restart: tuple[Failure, float] | None = None) -> RunLog:
    """Start every actor, continue from `checkpoint` (or step 0), run the loop to the end; returns the closed log.
    `restart`: the learner-group failure this session recovers from and when it was noticed (for failures.jsonl)."""
    from actors.groups import RLWorkers  # imports vLLM/DeepSpeed wrappers only once the config is known good

    try:
        workers = RLWorkers(cfg)
    except RuntimeError as e:  # placement: nothing fits, or no GPU node came within --placement.timeout_s
        raise SystemExit(f"could not start the actors: {e}")
    nodes = {}
    try:
        nodes = workers.nodes()
        start_step = workers.load(checkpoint)["step"] if checkpoint else 0
        log = RunLog(cfg.storage, to_yaml(cfg), resume_step=start_step, loggers=cfg.loggers, wandb=cfg.wandb)
        if restart:
            log.write_failures([dataclasses.replace(restart[0], recover_s=time.perf_counter() - restart[1])])
        log.write_json("nodes.json", nodes)
        for role, where in nodes.items():
            logger.info("%s: %s", role, ", ".join(f"{n['node_id'][:8]} ({n['ip']})" for n in where))
        log.write_json("precision.json", workers.precision)  # dtype auto: what each actor resolved on its node
        for role, records in workers.precision.items():
            logger.info("%s: %s", role, summarize(records))
        try:
            rl_loop(cfg, workers, train_ids, heldout_ids, log, start_step)
            if cfg.export:
                save_last_checkpoint(cfg, workers, log)
        finally:
            log.close()
    finally:
        replaced = {"replacement_engines": workers.replaced} if workers.replaced else {}  # engines that took a dead one's place
        save_actor_logs({**nodes, **replaced}, Storage(cfg.storage))  # each actor's stdout/stderr, also when the run failed
        workers.shutdown()
    return log


def save_last_checkpoint(cfg: RLConfig, workers, log: RunLog) -> None:
    """The export reads the last step's checkpoint: the loop saved one unless --checkpoint_every is 0. Then it is
    saved here, so the export has one code path (the one jobs.export runs) and can be redone from the run folder."""
    if not Storage(cfg.storage).exists(f"{CHECKPOINTS}/step_{cfg.steps:06d}/{MARKER}"):
        logger.info("--export: saving a checkpoint of the last step (%d) to export from", cfg.steps)
        workers.save(log.checkpoint_dir(cfg.steps), {"step": cfg.steps})


def export_final(cfg: RLConfig) -> str:
    """STORAGE/final_policy from the last step's checkpoint, on this process, after every actor is gone."""
    output = Storage(cfg.storage).location_of(FINAL)
    try:  # the run's own final policy: a rerun or a resume replaces it
        export_policy(cfg.storage, step=cfg.steps, output=output, overwrite=True)
    except ExportError as e:
        raise SystemExit(f"--export: {e}")
    return output


if __name__ == "__main__":
    main()
