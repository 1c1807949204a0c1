import copy

import pytest
import yaml

from pipeline.resume import check_resume_config, config_differences

SAVED = {"steps": 20, "seed": 0, "storage": "runs/a", "resume": False, "ray": {"address": "local"},
         "rollout": {"engines": 1, "n_samples": 4, "cpus_per_engine": 1, "resources": {}},
         "learner": {"ranks": 2, "total_steps": 20}}


def changed(**dotted):
    new = copy.deepcopy(SAVED)
    for name, value in dotted.items():
        *path, last = name.split("__")
        target = new
        for key in path:
            target = target[key]
        target[last] = value
    return new


def test_free_fields_are_not_differences():
    new = changed(storage="runs/b", resume=True, ray__address="auto", rollout__cpus_per_engine=4,
                  rollout__resources={"x": 1})
    assert config_differences(SAVED, new) == []
    assert check_resume_config(yaml.safe_dump(SAVED), new, [], "ck") == []
    # --export only says what happens after the run; checkpoints made before the field existed lack it
    assert config_differences(SAVED, dict(new, export=True)) == []


def test_every_run_changing_difference_is_listed_with_the_fix():
    new = changed(steps=40, rollout__engines=2, learner__ranks=1)
    with pytest.raises(SystemExit) as e:
        check_resume_config(yaml.safe_dump(SAVED), new, ["steps"], "ck/step_000002")
    message = str(e.value)
    assert "rollout.engines: 1 -> 2" in message and "learner.ranks: 2 -> 1" in message
    assert "steps: 20 -> 40" not in message  # forced
    assert "--resume_force steps,rollout.engines,learner.ranks" in message


def test_force_naming_all_differences_resumes():
    new = changed(steps=40, rollout__engines=2)
    assert check_resume_config(yaml.safe_dump(SAVED), new, ["steps", "rollout.engines"], "ck") == ["steps", "rollout.engines"]


def test_new_or_removed_fields_count_and_bad_force_names_are_refused():
    new = changed()
    new["rollout"]["top_p"] = 0.9
    assert config_differences(SAVED, new) == [("rollout.top_p", "(absent)", 0.9)]
    with pytest.raises(SystemExit, match="not config fields"):
        check_resume_config(yaml.safe_dump(SAVED), changed(), ["stpes"], "ck")
