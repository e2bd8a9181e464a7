"""Few-shot prompting and the evaluation protocol: example draws, prompt layout,
metrics per task and shot count, independence of batch size and of the number of ranks."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ablate.data import format as fmt
from ablate.eval.fewshot import build_prompt, draw_support, example_text
from tests.conftest import run_cli, train_args


def pool(n: int, same_image: dict[int, str] | None = None) -> list[dict]:
    same_image = same_image or {}
    return [{"id": f"q{i}", "image_id": same_image.get(i, f"img{i}"), "captions": [f"cap {i}"],
             "question": f"what is {i}", "answers": [str(i)] * 3 + ["x"]} for i in range(n)]


def test_support_draw_is_deterministic_excludes_the_query_and_nests():
    p = pool(50, same_image={7: "img3"})  # q7 shows the same image as q3
    q = p[3]
    eight = draw_support(p, q, 8, seed=0, task="vqa")
    assert len(eight) == 8
    ids = [s["id"] for s in eight]
    assert "q3" not in ids and "q7" not in ids  # neither the query nor its image
    assert draw_support(p, q, 8, seed=0, task="vqa") == eight  # same draw every time
    assert draw_support(p, q, 4, seed=0, task="vqa") == eight[:4]  # 4-shot within 8-shot
    assert draw_support(p, q, 0, seed=0, task="vqa") == []
    # Another seed, task or query draws other examples.
    assert [s["id"] for s in draw_support(p, q, 8, seed=1, task="vqa")] != ids
    assert [s["id"] for s in draw_support(p, q, 8, seed=0, task="coco")] != ids
    assert [s["id"] for s in draw_support(p, p[4], 8, seed=0, task="vqa")] != ids
    # A pool smaller than k gives every other sample.
    small = pool(3)
    assert sorted(s["id"] for s in draw_support(small, small[0], 8, 0, "t")) == ["q1", "q2"]


def test_draw_does_not_depend_on_the_process(tmp_path):
    """The draw seeds from strings, which Python hashes per process: check a fresh
    interpreter with another hash seed draws the same examples."""
    code = ("from ablate.eval.fewshot import draw_support;"
            "p=[{'id': f'q{i}'} for i in range(40)];"
            "print([s['id'] for s in draw_support(p, p[5], 6, 3, 'coco')])")
    outs = {run_cli(["-c", code], env={"PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert len(outs) == 1 and "q" in outs.pop()


class Tok:
    """A stand-in tokenizer with the ids build_prompt uses: one id per character."""
    bos_id, image_id = 1, 3

    def encode(self, text: str) -> list[int]:
        return [100 + ord(c) % 50 for c in text]


def test_prompt_layout_and_truncation():
    tok, p = Tok(), pool(10)
    shots = p[1:4]
    ids, kept = build_prompt(tok, "vqa", p[0], shots, tokens_per_image=5, budget=10_000, seed=0)
    expect = [tok.bos_id]
    for s in shots:
        expect += [3] * 5 + tok.encode(fmt.VQA_LINE.format(question=s["question"], answer=s["answers"][0]))
    expect += [3] * 5 + tok.encode(fmt.VQA_PROMPT.format(question=p[0]["question"]))
    assert ids == expect and kept == shots
    # The most common annotator answer is the one shown ("1" x3 beats "x").
    assert example_text("vqa", p[1], 0).endswith("answer: 1.")
    # A tight budget drops the earliest examples first, never the query.
    full = len(ids)
    one = len(tok.encode(fmt.VQA_LINE.format(question=p[1]["question"], answer="1"))) + 5
    ids2, kept2 = build_prompt(tok, "vqa", p[0], shots, 5, budget=full - 1, seed=0)
    assert kept2 == shots[1:] and len(ids2) == full - one
    with pytest.raises(ValueError, match="max_seq_len"):
        build_prompt(tok, "caption", p[0], [], 5, budget=4, seed=0)
    # Captions: image then caption, the query image last with nothing after it.
    ids3, _ = build_prompt(tok, "caption", p[0], p[1:2], 2, 10_000, 0)
    assert ids3 == [1, 3, 3] + tok.encode("cap 1") + [3, 3]


# ---------------------------------------------------------------------------------------
# The whole protocol on a trained tiny model


def only_run(runs):
    dirs = [p.parent for p in runs.rglob("config.yaml") if ".hydra" not in p.parts]
    assert len(dirs) == 1, f"expected one run under {runs}: {dirs}"
    return dirs[0]


@pytest.fixture(scope="module")
def fewshot_run(corpus, tmp_path_factory):
    """A smoke run evaluated at 0/2/4 shots, also every 4 steps, logging to wandb offline."""
    runs = tmp_path_factory.mktemp("fewshot")
    res = run_cli(train_args(corpus, runs, "eval.shots=[0,2,4]", "eval.every=4",
                             "logger.backend=wandb", "eval.log_samples=3"), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return only_run(runs)


def test_results_hold_every_task_and_shot(fewshot_run):
    r = json.loads((fewshot_run / "results.json").read_text())
    assert r["schema_version"] == 2
    m, block = r["metrics"], r["eval"]
    for key in ("caption/cider", "caption/cider_2shot", "caption/cider_4shot",
                "vqa/accuracy", "vqa/accuracy_2shot", "vqa/accuracy_4shot", "text/loss"):
        assert key in m and m[key] == m[key], key  # present, not NaN
    assert block["shots"] == [0, 2, 4]
    assert block["tasks"]["vqa"]["scores"]["4"] == m["vqa/accuracy_4shot"]
    assert block["tasks"]["caption"]["queries"] == 8
    assert "vqa/accuracy" in r["baselines"] and "caption/cider" in r["baselines"]
    samples = json.loads((fewshot_run / "samples.json").read_text())
    assert len(samples["vqa"]) == 3 and set(samples["vqa"][0]["predictions"]) == {"0", "2", "4"}


def test_eval_during_training_is_logged_with_a_table(fewshot_run):
    from ablate.tracking import read_metrics

    steps = [r["step"] for r in read_metrics(fewshot_run) if "vqa/accuracy_2shot" in r]
    assert steps == [4, 8]  # every 4 steps, the last being the final evaluation
    tables = list(fewshot_run.rglob("eval/samples_*.table.json"))
    assert len(tables) == 2, list(fewshot_run.rglob("*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["task", "id", "image", "shots"]
    assert len(table["data"]) == 2 * 3 * 3  # tasks x samples x shot counts
    # Each query image kept as a file also in offline runs (one file per distinct image).
    images = list(fewshot_run.rglob("media/images/eval/samples_images_8_*.png"))
    assert len(images) == 2 * 3, images


def samples_json(samples):
    from ablate.eval.evaluate import samples_json as strip

    return strip(samples)


def _evaluate(run_dir, *sets):
    from omegaconf import OmegaConf

    from ablate.build import build_model
    from ablate.data.tokenizer import load_tokenizer
    from ablate.eval.cli import load_module_state
    from ablate.eval.evaluate import evaluate

    cfg = OmegaConf.merge(OmegaConf.load(run_dir / "config.yaml"), OmegaConf.from_dotlist(list(sets)))
    tok = load_tokenizer(cfg.paths.data)
    model = build_model(cfg, tok.vocab_size, tok.image_id)
    model.load_state_dict(load_module_state(run_dir / "checkpoints", None)[1])
    return evaluate(model, tok, cfg, device=torch.device("cpu"))


def test_metrics_do_not_depend_on_the_batch_size(fewshot_run):
    a = _evaluate(fewshot_run, "eval.batch_size=1", "eval.log_samples=8")
    b = _evaluate(fewshot_run, "eval.batch_size=5", "eval.log_samples=8")
    # Every prediction of every query at every shot count is the same text...
    assert samples_json(a["samples"]) == samples_json(b["samples"])
    assert len({p for s in a["samples"]["caption"] for p in s["predictions"].values()}) > 1
    # ...so the scores are; the text loss only up to float summation order.
    assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-5, abs=1e-6)
    final = json.loads((fewshot_run / "results.json").read_text())["metrics"]
    assert {k: v for k, v in final.items() if k != "train/loss"} == pytest.approx(a["metrics"], rel=1e-5)


def _rank_eval(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from pathlib import Path

        ev = _evaluate(Path(run_dir), "eval.batch_size=3")
        if rank == 0:
            Path(out).write_text(json.dumps(ev["metrics"]))
    finally:
        dist.destroy_process_group()


def test_metrics_do_not_depend_on_the_number_of_ranks(fewshot_run, tmp_path):
    import torch.multiprocessing as mp

    from ablate.dist import free_port

    out = tmp_path / "two_ranks.json"
    mp.start_processes(_rank_eval, args=(2, free_port(), str(fewshot_run), str(out)), nprocs=2,
                       start_method="spawn")
    two = json.loads(out.read_text())
    one = _evaluate(fewshot_run, "eval.batch_size=3")["metrics"]
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)


def test_converted_benchmarks_are_scored_per_shot_with_averages(fewshot_run, tmp_path):
    """COCO and NoCaps (two caption tasks: an average) and VQAv2 converted from files in
    their real layouts, evaluated next to the synthetic sets."""
    from ablate.data.cli import main as data_cli
    from tests.test_benchmarks import build_coco, build_nocaps, build_vqav2

    dirs = {}
    for name, build in (("coco", build_coco), ("nocaps", build_nocaps), ("vqav2", build_vqav2)):
        source, _ = build(tmp_path / f"src_{name}")
        dirs[name] = tmp_path / name
        assert data_cli(["convert", name, "--out", str(dirs[name]), *source, "--no-progress"]) == 0
    sets = [f"eval.benchmarks.{n}={d}" for n, d in dirs.items()]
    ev = _evaluate(fewshot_run, *sets, "eval.max_caption=0", "eval.max_vqa=0")
    m, block = ev["metrics"], ev["eval"]
    for name, metric in (("coco", "cider"), ("nocaps", "cider"), ("vqav2", "accuracy")):
        for k, suffix in ((0, ""), (2, "_2shot"), (4, "_4shot")):
            assert f"{name}/{metric}{suffix}" in m
            assert block["tasks"][name]["scores"][str(k)] == m[f"{name}/{metric}{suffix}"]
    assert block["tasks"]["vqav2"]["queries"] == 5 and block["tasks"]["coco"]["source"] == str(dirs["coco"])
    # MM1-style average over the two caption tasks, per shot count; one VQA task: none.
    for k, suffix in ((0, ""), (4, "_4shot")):
        assert m[f"avg/caption{suffix}"] == pytest.approx((m[f"coco/cider{suffix}"] + m[f"nocaps/cider{suffix}"]) / 2)
    assert "avg/vqa" not in m and "caption/cider" not in m
    # Support examples were drawn from the task's own pool (3-4 images): at 4 shots a
    # query gets every other sample of its pool, never itself.
    assert block["tasks"]["nocaps"]["support"] == 3
