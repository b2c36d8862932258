"""`membank eval --preset smoke` and `membank eval-scaling --preset smoke`: the long-tail pipeline
end to end (not its accuracy): domains, seeds, variants, RAG, partial paths, determinism."""
import gzip
import json

import pytest

from membank_cli.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def answers(run_dir) -> list[dict]:
    return [json.loads(line)
            for line in gzip.decompress((run_dir / "prompts.jsonl.gz").read_bytes()).splitlines()]


def test_eval_smoke_writes_json_table_and_plot_and_reproduces(tmp_path):
    results = tmp_path / "out" / "longtail.json"
    main(["eval", "--preset", "smoke", "--out", str(tmp_path / "run"), "--results", str(results),
          "--seeds", "0,1", "--threads", "1"])
    r = json.loads(results.read_text())
    # two seeds: two whole runs over five built-in domains, pooled, and each seed's own table
    assert r["seeds"] == [0, 1] and len(r["domains"]) == 5
    assert r["n_prompts"] == sum(r["n_subjects_per_seed"]) and len(r["n_subjects_per_seed"]) == 2
    assert ((tmp_path / "run" / "seed-0" / "memory").is_dir()
            and (tmp_path / "run" / "seed-1" / "dense").is_dir())
    for name in ("anchor", "fetched"):
        pooled = r["accuracy_overall"][name]
        assert abs(pooled - sum(x["accuracy_overall"][name] for x in r["per_seed"]) / 2) < 1e-9
    for name in ("anchor", "generic", "fetched", "dense", "blocked", "cotrained-anchor",
                 "fetched-int8", "fetched-centroid", "fetched-levels-1", "anchor+rag",
                 "fetched+rag"):
        assert len(r["accuracy_per_bucket"][name]) == 5, name
    for name in ("anchor", "fetched", "blocked", "fetched-levels-1"):
        assert r["perplexity"][name] > 1
    assert r["rag_extra_prompt_tokens"] > 0
    assert set(r["per_domain"]) == set(r["domains"])
    assert len(r["capacity"]["anchor_train_phrasing_per_bucket"]) == 5
    assert (0 <= r["routing"]["level1_in_domain"] <= 1
            and len(r["routing"]["routed"]["home_per_level"]) == 2)
    assert set(r["targets"]) >= {"rarest_fetched_ge_3x_anchor",
                                 "separation_cotrained_anchor_common_within_5",
                                 "level1_domain_routing_ge_95pct"}
    # equal runtime parameters: dense = anchor + fetch, up to rounding to whole neurons
    p = r["runtime_params"]
    assert (p["fetched"] == p["anchor"] + r["fetch_params"]
            and abs(p["dense"] - p["fetched"]) <= 3 * 32 * 2)
    assert p["anchor"] < p["fetched-levels-1"] < p["fetched"]
    md = results.with_suffix(".md").read_text()
    assert md.startswith("| model |") and "RAG next to memory" in md and "Partial paths" in md
    assert results.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = answers(tmp_path / "run")
    assert (len(rows) == r["n_prompts"]
            and [x["seed"] for x in rows].count(0) == r["n_subjects_per_seed"][0])
    # the blocked route never enters the prompt's own level-1 node; buckets rise with mentions
    assert all(x["blocked_path"][0] != x["path"][0] for x in rows)
    for d in r["domains"]:
        spans = r["per_domain"][d]["bucket_mentions"]
        assert all(spans[b][1] <= spans[b + 1][0] for b in range(4))

    # a rerun reuses every trained model (checkpoints) and gives the same answers
    main(["eval", "--preset", "smoke", "--out", str(tmp_path / "run"),
          "--results", str(tmp_path / "again.json"), "--seeds", "0,1", "--threads", "1"])
    assert [x["fetched"] for x in answers(tmp_path / "run")] == [x["fetched"] for x in rows]
    # a fresh run elsewhere (nothing shared, not even embeddings), its two seeds trained at once
    # in child processes of 2 / 2 = 1 thread each, gives the same bits: every answer of every
    # variant, the losses, the perplexities
    main(["eval", "--preset", "smoke", "--out", str(tmp_path / "fresh"),
          "--results", str(tmp_path / "fresh.json"), "--seeds", "0,1", "--threads", "2",
          "--jobs", "2"])
    assert answers(tmp_path / "fresh") == rows
    fresh = json.loads((tmp_path / "fresh.json").read_text())
    assert fresh["per_seed"] == r["per_seed"] and fresh["perplexity"] == r["perplexity"]
    loss = lambda run: json.loads(  # noqa: E731
        (run / "memory" / "cotrain-end" / "state.json").read_text())["losses"]
    for seed in (0, 1):
        assert loss(tmp_path / "fresh" / f"seed-{seed}") == loss(tmp_path / "run" / f"seed-{seed}")
    assert (tmp_path / "fresh" / "seed-1" / "train.log").is_file()

    # re-probing finished checkpoints only: the same answers; nothing to reuse: refused at once
    from training.evaluate import eval_preset, run_eval
    ec = eval_preset("smoke")
    ec.seeds = (0, 1)
    run_eval(tmp_path / "run", ec, results=tmp_path / "r3.json", preset="smoke", reuse_only=True)
    assert ([x["fetched-int8"] for x in answers(tmp_path / "run")]
            == [x["fetched-int8"] for x in rows])
    with pytest.raises(ValueError, match="no checkpoints"):
        run_eval(tmp_path / "empty", eval_preset("smoke"), reuse_only=True)


def write_domain(tmp_path, template="The mascot of {subject} is"):
    """A user's own domain: made-up clubs and their mascots, a probe with a held-out template."""
    clubs = [(f"Club{i}", ["Heron", "Badger", "Otter", "Falcon"][i % 4]) for i in range(24)]
    corpus = tmp_path / "clubs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{c} has the mascot {m}. "
                                                  f"The {m} is the emblem of {c}.",
                                          "subject": c}) + "\n"
                              for c, m in clubs for _ in range(1 + clubs.index((c, m)) % 3)))
    probe = tmp_path / "clubs.json"
    probe.write_text(json.dumps({"name": "clubs", "template": template, "matcher": "string",
                                 "train_templates": ["{subject} has the mascot"], "pairs": clubs}))
    return corpus, probe


def test_eval_takes_a_users_own_domain(tmp_path):
    corpus, probe = write_domain(tmp_path)
    results = tmp_path / "r.json"
    main(["eval", "--preset", "smoke", "--out", str(tmp_path / "run"), "--results", str(results),
          "--builtin-domains", "elements", "--domain", f"{corpus}:{probe}"])
    r = json.loads(results.read_text())
    assert r["domains"] == ["elements", "clubs"]
    assert r["per_domain"]["clubs"]["n_prompts"] == 24
    # the user's corpus names each document's subject: the home-leaf diagnostic covers it
    assert any(x["domain"] == "clubs" and "fetched-home" in x for x in answers(tmp_path / "run"))


def test_eval_refuses_a_corpus_that_contains_a_template(tmp_path, capsys):
    corpus, probe = write_domain(tmp_path, template="{subject} has the mascot")
    with pytest.raises(SystemExit):
        main(["eval", "--preset", "smoke", "--out", str(tmp_path / "run"),
              "--builtin-domains", "none", "--domain", f"{corpus}:{probe}"])
    assert "contains the clubs probe's template" in capsys.readouterr().err


def test_eval_rejects_bad_arguments(tmp_path, capsys):
    corpus, probe = write_domain(tmp_path)
    for argv, message in ((["--seeds", "0,x"], "--seeds takes comma-separated integers"),
                          (["--set", "corpus.nope=1"], "bad corpus override"),
                          (["--set", "corpus.seed=1"], "seeds: --seeds"),
                          (["--set", "corpus.min_docs=two"], "is not a number"),
                          (["--domain", str(corpus)], "--domain takes CORPUS.jsonl:PROBE.json"),
                          (["--domain", f"{corpus}:{tmp_path}/absent.json"], "no file"),
                          (["--builtin-domains", "planets"], "unknown built-in domain"),
                          (["--builtin-domains", "none"], "no domains")):
        with pytest.raises(SystemExit):
            main(["eval", "--preset", "smoke", "--out", str(tmp_path / "run"), *argv])
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_eval_scaling_smoke(tmp_path):
    results = tmp_path / "scaling.json"
    main(["eval-scaling", "--preset", "smoke", "--out", str(tmp_path / "run"),
          "--results", str(results)])
    r = json.loads(results.read_text())
    assert [p["ranks"] for p in r["points"]] == [[2, 2], [1, 3]]
    assert r["points"][0]["fetch_params"] == r["points"][1]["fetch_params"]
    assert r["points"][0]["bank_params"] < r["points"][1]["bank_params"]
    assert all(len(p["accuracy_per_bucket"]) == 5 and p["perplexity"] > 1 for p in r["points"])
    assert results.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every grid point starts from the one pretrained anchor
    assert (tmp_path / "run" / "seed-0" / "pretrain" / "anchor-end").is_dir()


def test_a_seed_whose_training_fails_is_reported_with_its_log(tmp_path):
    """--jobs: a child that fails surfaces as one ValueError naming its seed and log tail."""
    from training.evaluate import DomainFiles, _run_children, eval_preset

    ec = eval_preset("smoke")
    dirs = [tmp_path / "seed-0", tmp_path / "seed-1"]
    for d in dirs:
        d.mkdir()
    missing = [DomainFiles(tmp_path / "gone.jsonl", tmp_path / "gone.json")]
    running: list = []
    with pytest.raises(ValueError, match=r"seed \d: training failed .*train.log ends"):
        _run_children(list(zip((0, 1), dirs)), running, ec, missing, 2, log=lambda *a: None)
    for _, _, proc, _ in running:        # what train_in_children's finally does
        proc.terminate()
        proc.wait()
    assert any("gone.jsonl" in (d / "train.log").read_text() for d in dirs)
