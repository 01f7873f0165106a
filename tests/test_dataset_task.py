"""The `dataset` task: data on disk (save_to_disk, parquet, JSON lines) with named columns, scored
by a named verifier; `percep gen --format trl`; and a spec that trains and evaluates on data that
`percep gen` wrote."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
from realise import compile_spec

from percepdsl.check import check_text
from percepdsl.ir import DatasetParams
from percepdsl_runtime.tasks import build_task
from percepdsl_runtime.tasks.dataset import write_dataset
from percepdsl_runtime.tasks.disk import DatasetTask

ROOT = Path(__file__).resolve().parents[1]


def dataset_task(**params) -> DatasetTask:
    return DatasetTask(DatasetParams(**params), seed=0)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[object, Path]]:
    """`percep gen`'s hf format of both built-in tasks (the original task kept to compare with)."""
    out = tmp_path_factory.mktemp("gen")
    made = {}
    for name, params in (("graph_coloring", {"nodes": (4, 5)}), ("sudoku", {})):
        task = build_task(name, {**params, "train": 6, "test": 3}, seed=1)
        made[name] = (task, write_dataset(task, out / name, {"train": 6, "test": 3}))
    return made


@pytest.mark.parametrize("verifier", ["graph_coloring", "sudoku"])
@pytest.mark.parametrize("instance", [None, "instance"], ids=["recovered", "column"])
def test_percep_gen_output_reads_back_as_the_same_items(generated, verifier: str, instance: str | None) -> None:
    """Every item comes back as the generator made it, and its verifier is the built-in task's:
    the instance recovered from the perception text scores exactly as the true one."""
    task, path = generated[verifier]
    ds = dataset_task(path=str(path), verifier=verifier, instance=instance)
    assert ds.size("train") == 6 and ds.size("test") == 3
    for split in ("train", "test"):
        for i in range(ds.size(split)):
            a, b = task.sample(split, i), ds.sample(split, i)
            assert (b.query, b.perception, b.response, b.ground_truth) == (a.query, a.perception, a.response, a.ground_truth)
            assert b.image.tobytes() == a.image.tobytes() and b.id == f"dataset/{split}/{i}"
            if verifier == "graph_coloring":
                assert {k: b.instance[k] for k in ("num_nodes", "edges", "chromatic_number")} == {
                    k: a.instance[k] for k in ("num_nodes", "edges", "chromatic_number")
                }
            else:
                assert b.instance["puzzle"] == a.instance["puzzle"]
            for text in (a.response, a.response.replace(a.ground_truth, a.ground_truth[::-1]), "<perception> 1 </perception>"):
                assert ds.score(b.instance, text) == task.score(a.instance, text)
            assert ds.parse_perception(a.response) == task.parse_perception(a.response)
            assert ds.counterfactual_prefix(b) == task.counterfactual_prefix(a)
    assert set(task.vocabulary()) <= set(ds.vocabulary())


def test_hub_layout_parquet_with_other_column_names_and_exact_match(generated, tmp_path: Path) -> None:
    """A local copy of a hub dataset: data/<split>-00000-of-00001.parquet, its own column names."""
    _, path = generated["graph_coloring"]
    src = datasets.load_from_disk(str(path))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for split in ("train", "test"):
        renamed = src[split].rename_columns({"query": "question", "perception": "p_star", "reasoning": "cot", "answer": "solution"})
        renamed.to_parquet(str(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    spec = (
        'experiment hub\ntask dataset { path = "hub", query = "question", perception = "p_star", reasoning = "cot",\n'
        '  answer = "solution", verifier = exact_match, train = 4 }\nstage s = sft { steps = 1, batch = 4 }\n'
    )
    res = check_text(spec, "spec.pd", base_dir=tmp_path)
    assert res.ok, [d.message for d in res.diagnostics]
    p = res.ir.task.params
    assert p.path == str((tmp_path / "hub").resolve()) and p.verifier == "exact_match"
    ds = build_task("dataset", p.model_dump(), seed=0)
    assert ds.size("train") == 4 and ds.size("test") == 3
    s = ds.sample("test", 1)
    ok = ds.score(s.instance, s.response)
    assert ok.outcome and ok.perception_exact and ok.format_ok and ok.reasoning and ok.perception_partial == 1.0
    wrong = ds.score(s.instance, s.response.replace("</perception>", "9-9 </perception>", 1))
    assert wrong.outcome and not wrong.perception_exact and not wrong.reasoning and 0 < wrong.perception_partial < 1


def test_json_lines_with_image_paths(tmp_path: Path) -> None:
    task = build_task("sudoku", {"train": 3, "test": 2}, seed=0)
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / "img").mkdir(exist_ok=True)
        with (tmp_path / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                s = task.sample(split, i)
                s.image.save(tmp_path / "img" / f"{split}{i}.png")
                reasoning = s.response.split("<reasoning>")[1].split("</reasoning>")[0].strip()
                f.write(
                    json.dumps(
                        {
                            "q": s.query,
                            "img": f"img/{split}{i}.png",
                            "perception": s.perception,
                            "reasoning": reasoning,
                            "answer": s.ground_truth,
                        }
                    )
                    + "\n"
                )
    ds = dataset_task(path=str(tmp_path), query="q", image="img", verifier="sudoku")
    s, ref = ds.sample("train", 2), task.sample("train", 2)
    assert s.response == ref.response and s.image.tobytes() == ref.image.tobytes()
    assert ds.score(s.instance, ref.response).outcome and ds.verifier.params.size == 4


SPEC = """\
experiment from_disk
seed 0
task dataset { path = "%s", verifier = graph_coloring%s }
model tiny { width = 16, depth = 1, heads = 1, vision_width = 16, vision_depth = 1, patch = 16px }
stage base = sft { steps = 4, batch = 2 }
eval { test = 3, max_new_tokens = 16 }
trainer { precision = "32-true", log_every = 1 }
"""


@pytest.mark.parametrize(
    "where_data, extra, code, where",
    [
        ("nowhere", "", "missing-data", "no such file or directory"),
        (None, ', test_split = "validation"', "missing-split", "has no split `validation` (`test_split`); its splits: test, train"),
        (None, ', image = "picture"', "missing-column", "has no column `picture` (`image`)"),
        (None, ', train_split = "test"', "incompatible", "both `test`"),
    ],
)
def test_missing_data_splits_and_columns_are_located_check_errors(
    generated, tmp_path: Path, where_data: str | None, extra: str, code: str, where: str
) -> None:
    _, path = generated["graph_coloring"]
    text = SPEC % (where_data or path, extra)
    res = check_text(text, "spec.pd", base_dir=tmp_path)
    errors = [d for d in res.diagnostics if d.is_error]
    assert [d.code for d in errors] == [code], [d.message for d in errors]
    assert where in errors[0].message and errors[0].span.line == 3

    from typer.testing import CliRunner

    from percepdsl.cli import app

    spec = tmp_path / "s.pd"
    spec.write_text(text)
    out = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "runs")])
    assert out.exit_code == 2 and "s.pd:3:" in out.output and f"error[{code}]" in out.output and "Traceback" not in out.output


def test_rows_that_do_not_state_an_instance_are_refused_before_training(generated, tmp_path: Path) -> None:
    _, path = generated["graph_coloring"]
    spec = tmp_path / "s.pd"
    spec.write_text(SPEC % (path, ", perception_format = adjacency"))  # the data uses the edge list
    from typer.testing import CliRunner

    from percepdsl.cli import app

    out = CliRunner().invoke(app, ["run", str(spec), "--out", str(tmp_path / "runs")])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "row 0 of split `train`" in out.output and "is not a graph in the `adjacency` format" in out.output
    assert not list((tmp_path / "runs").glob("*/stages"))


def test_a_spec_trains_and_evaluates_on_percep_gen_output(generated, tmp_path: Path) -> None:
    from percepdsl_runtime.run import run

    _, path = generated["graph_coloring"]
    text = SPEC % (path, "")
    ir = compile_spec(text)
    run_dir = run(ir, {"spec.pd": text}, tmp_path, progress=False, echo=lambda _: None)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["stages"]["base"]["steps"] == 4
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["dataset/test/0", "dataset/test/1", "dataset/test/2"]
    assert summary["diagnostics"]["token_share"]["perception"] > 0  # the roles tag the built target


def test_percep_gen_trl_format_is_what_trl_takes(tmp_path: Path) -> None:
    from trl.data_utils import is_conversational, prepare_multimodal_messages

    task = build_task("graph_coloring", {"train": 3, "test": 2}, seed=0)
    path = write_dataset(task, tmp_path / "trl", {"train": 3, "test": 2}, fmt="trl")
    data = datasets.load_from_disk(str(path))
    assert set(data) == {"train", "test"} and set(data["train"].column_names) >= {"prompt", "completion", "images"}
    row = data["train"][1]
    s = task.sample("train", 1)
    assert is_conversational(row)
    assert row["prompt"] == [{"role": "user", "content": s.query}] and row["completion"] == [{"role": "assistant", "content": s.response}]
    assert len(row["images"]) == 1 and row["images"][0].convert("RGB").tobytes() == s.image.tobytes()
    msgs = prepare_multimodal_messages(row["prompt"], images=row["images"])  # what TRL's collators do first
    assert [c["type"] for c in msgs[0]["content"]] == ["image", "text"] and msgs[0]["content"][1]["text"] == s.query
    assert json.loads(row["instance"]) == s.instance


def test_split_names_of_the_data_and_exact_match_beside_an_instance_column(generated, tmp_path: Path) -> None:
    task, path = generated["graph_coloring"]
    src = datasets.load_from_disk(str(path))
    datasets.DatasetDict({"tr": src["train"], "ev": src["test"]}).save_to_disk(str(tmp_path / "renamed"))
    ds = dataset_task(path=str(tmp_path / "renamed"), train_split="tr", test_split="ev", verifier="exact_match", instance="instance")
    s, ref = ds.sample("test", 2), task.sample("test", 2)
    assert s.id == "dataset/ev/2" and s.response == ref.response and s.instance["row"] == ref.instance
    assert ds.score(s.instance, ref.response).outcome and not ds.score(s.instance, ref.response.replace(ref.ground_truth, "c9")).outcome
    assert ds.sample("train", 5).response == task.sample("train", 5).response


@pytest.mark.parametrize(
    "change, refusal",
    [
        (
            (", verifier = graph_coloring", ", verifier = graph_coloring, train = 10"),
            "`train = 10` asks for more rows than split `train` has (6)",
        ),
        (("steps = 4, batch = 2", "steps = 4, batch = 8"), "stage `base`: `batch = 8` is more than the 6 training items of the task"),
        (("eval { test = 3", "eval { test = 5"), "eval: `test = 5` is more than the 3 test items of the task"),
    ],
    ids=["rows", "batch", "eval"],
)
def test_counts_the_data_cannot_fill_are_refused_before_training(generated, tmp_path: Path, change, refusal: str) -> None:
    """The checker cannot count a dataset's rows: `train = 10` of 6 rows trained on 6, `batch = 8`
    on batches of 6, `eval { test = 5 }` of 3 rows evaluated 3, all silently. The run refuses them."""
    from percepdsl_runtime.run import RunRefused, prepare

    _, path = generated["graph_coloring"]
    text = (SPEC % (path, "")).replace(*change)
    assert change[1] in text
    with pytest.raises(RunRefused, match=re.escape(refusal)):
        prepare(compile_spec(text), tmp_path, echo=lambda _: None)


def test_counterfactual_prefix_is_the_start_of_the_trained_response_with_an_empty_perception(tmp_path: Path) -> None:
    """a_r forces `<perception> p* </perception> <reasoning>` as the start of the answer: it must be the
    text the model was trained on. A row with an empty (or missing) perception wrote two spaces between
    the markers where the target has one, which a BPE tokenizer turns into other tokens."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), "white").save(tmp_path / "img" / "a.png")
    for split in ("train", "test"):
        with (tmp_path / f"{split}.jsonl").open("w") as f:
            for p in ("", None, "  x   y "):
                f.write(json.dumps({"query": "q", "image": "img/a.png", "perception": p, "reasoning": "r", "answer": "a"}) + "\n")
    ds = dataset_task(path=str(tmp_path), verifier="exact_match")
    for i in range(3):
        s = ds.sample("test", i)
        assert s.response.startswith(ds.counterfactual_prefix(s) + " "), (ds.counterfactual_prefix(s), s.response)


def test_a_stage_cannot_set_settings_of_a_dataset(generated, tmp_path: Path) -> None:
    """A dataset's items are its rows as written: a stage's `task { ... }` is refused, located."""
    _, path = generated["graph_coloring"]
    spec = f'experiment d\ntask dataset {{ path = "{path}", verifier = graph_coloring }}\nstage s = sft {{ steps = 1, batch = 2, task {{ reasoning = brief }} }}\n'
    res = check_text(spec, "spec.pd", base_dir=tmp_path)
    errors = [d for d in res.diagnostics if d.is_error]
    assert [d.code for d in errors] == ["stage-task"] and "rows of the data on disk" in errors[0].message
    assert (errors[0].span.line, errors[0].span.column) == (3, 39)
