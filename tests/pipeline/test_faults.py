"""The failure-injection hook's config (--faults.kill) and the failure records, without Ray."""
import pytest

from pipeline.config import ConfigError, parse_config
from pipeline.faults import Failure, Fault, FaultsConfig, check_faults, failure_metrics, parse_fault


def test_kill_specs_parse_with_the_roles_default_phase():
    assert parse_fault("rollout_engines:1@3") == Fault("rollout_engines", 1, 3, "rollout")
    assert parse_fault("scorers:0@2:score") == Fault("scorers", 0, 2, "score")
    cfg = FaultsConfig(kill=["rollout_engines:0@1", "scorers:0@1"])
    assert cfg.due("rollout_engines", 1, "rollout") == [0] and cfg.due("scorers", 1, "score") == [0]
    assert cfg.due("rollout_engines", 2, "rollout") == [] and cfg.due("scorers", "heldout", "score") == []
    assert FaultsConfig().faults == []  # off by default


@pytest.mark.parametrize("spec, says", [("engine:0@1", "role 'engine'"), ("scorers:0", "ROLE:INDEX@STEP"),
                                        ("scorers:0@1:rollout", "phase score"), ("rollout_engines:x@1", "ROLE:INDEX@STEP")])
def test_a_bad_kill_spec_is_refused_naming_the_field(spec, says):
    with pytest.raises(ConfigError, match="--faults.kill") as error:
        FaultsConfig(kill=[spec])
    assert says in str(error.value)


def test_a_bad_kill_spec_stops_the_job_at_config_time():
    from jobs.rlhf import RLConfig
    with pytest.raises(SystemExit, match=r"--faults.kill 'scorers@1'"):
        parse_config(RLConfig, ["--faults.kill", "scorers@1"])


def test_a_kill_of_an_actor_or_step_the_run_lacks_is_refused():
    counts = {"rollout_engines": 1, "scorers": 1}
    check_faults(FaultsConfig(kill=["rollout_engines:0@2"]), counts, steps=3)
    with pytest.raises(ConfigError, match="has 1 rollout_engines"):
        check_faults(FaultsConfig(kill=["rollout_engines:1@1"]), counts, steps=3)
    with pytest.raises(ConfigError, match="step 3 is not run"):
        check_faults(FaultsConfig(kill=["scorers:0@3"]), counts, steps=3)


def test_failure_metrics_sum_a_steps_failures():
    assert failure_metrics([]) == {}
    failures = [Failure("rollout_engines_0", 1, "rollout", "died", 2.0, 4), Failure("scorers_0", 1, "score", "died", 1.5, 4)]
    assert failure_metrics(failures) == {"faults/count": 2.0, "faults/recover_s": 3.5, "faults/rows_redone": 8.0}


def test_a_kill_fires_once_so_steps_redone_after_a_restart_do_not_hit_it_again():
    cfg = FaultsConfig(kill=["policy_learners:1@2"])
    assert cfg.faults == [Fault("policy_learners", 1, 2, "train")]
    assert cfg.due("policy_learners", 2, "train") == [1]
    assert cfg.due("policy_learners", 2, "train") == []  # the redone step 2 after the restart


def test_hang_specs_parse_for_the_roles_whose_silence_is_noticed():
    cfg = FaultsConfig(kill=["rollout_engines:0@1"], hang=["rollout_engines:0@2", "policy_learners:1@2"])
    assert cfg.faults[1:] == [Fault("rollout_engines", 0, 2, "rollout", "hang"), Fault("policy_learners", 1, 2, "train", "hang")]
    assert cfg.due("rollout_engines", 1, "rollout", "hang") == [] and cfg.due("rollout_engines", 1, "rollout") == [0]
    assert cfg.due("rollout_engines", 2, "rollout") == [] and cfg.due("rollout_engines", 2, "rollout", "hang") == [0]
    with pytest.raises(ConfigError, match=r"--faults.hang 'scorers:0@1': role 'scorers' is not one of rollout_engines, "
                                          r"policy_learners"):
        FaultsConfig(hang=["scorers:0@1"])  # a wedged scorer is not recovered: its phase times out, naming it
    with pytest.raises(ConfigError, match=r"--faults.hang 'policy_learners:2@1': the run has 2 policy_learners"):
        check_faults(FaultsConfig(hang=["policy_learners:2@1"]), {"policy_learners": 2}, steps=3)
