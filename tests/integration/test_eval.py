"""`membank eval --preset smoke`: the long-tail pipeline end to end (not its accuracy)."""
import json

import pytest

from membank.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_eval_smoke_writes_json_table_and_plot(tmp_path):
    results = tmp_path / "out" / "longtail.json"
    main(["eval", "--preset", "smoke", "--out", str(tmp_path / "run"), "--results", str(results),
          "--seeds", "0,1"])
    r = json.loads(results.read_text())
    # two seeds: two whole runs, pooled (118 prompts each), and each seed's own table
    assert r["seeds"] == [0, 1] and r["n_subjects"] == 118 and len(r["prompts"]) == 236
    assert [p["seed"] for p in r["prompts"]] == [0] * 118 + [1] * 118
    assert (tmp_path / "run" / "seed-0" / "memory").is_dir() and (tmp_path / "run" / "seed-1" / "dense").is_dir()
    for name in ("anchor", "fetched"):
        pooled = r["accuracy_overall"][name]
        assert abs(pooled - sum(x["accuracy_overall"][name] for x in r["per_seed"]) / 2) < 1e-9
    assert "Pooled over 2 seeds" in results.with_suffix(".md").read_text()
    # the diagnostics: routing per bucket, and the memory with probes sent to the home leaf
    assert len(r["routing"]["probe_in_home_leaf_per_bucket"]) == 5
    assert 0 <= r["routing"]["fetched_home_route_overall"] <= 1
    for name in ("anchor", "generic", "fetched", "dense", "blocked", "cotrained-anchor",
                 "fetched-int8"):
        assert len(r["accuracy_per_bucket"][name]) == 5
        assert r["perplexity"][name] > 1
    # int8: the fetched memory through quantize -> dequantize, and the bytes of one path
    q = r["int8"]
    assert all(name in p for p in r["prompts"] for name in ("fetched", "fetched-int8"))
    assert q["dtype"] == "float32" and 0.25 < q["path_ratio"] < 0.3      # 1 B + 4 B/row vs 4 B
    assert q["path_int8_bytes"] == sum(x["int8_bytes"] for x in q["levels"])
    assert all(0 < x["relative_l2_error"] < 0.02 for x in q["levels"])
    assert abs(q["perplexity_change"] - (r["perplexity"]["fetched-int8"] - r["perplexity"]["fetched"])) < 1e-12
    assert "| fetched-int8 |" in results.with_suffix(".md").read_text()
    # equal runtime parameters: dense = anchor + fetch, up to rounding to whole neurons
    assert r["runtime_params"]["fetched"] == r["runtime_params"]["anchor"] + r["fetch_params"]
    assert abs(r["runtime_params"]["dense"] - r["runtime_params"]["fetched"]) <= 3 * 32 * 2
    # the blocked route never enters the prompt's own level-1 node
    assert all(p["blocked_path"][0] != p["path"][0] for p in r["prompts"])
    # buckets: 5 groups ordered by mentions, rarest first
    spans = r["bucket_mentions"]
    assert all(spans[b][1] <= spans[b + 1][0] for b in range(4))
    assert results.with_suffix(".md").read_text().startswith("| model |")
    assert results.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun reuses every trained model (checkpoints) and gives the same answers
    again = tmp_path / "again.json"
    main(["eval", "--preset", "smoke", "--out", str(tmp_path / "run"), "--results", str(again),
          "--seeds", "0,1"])
    r2 = json.loads(again.read_text())
    assert [p["fetched"]["text"] for p in r2["prompts"]] == [p["fetched"]["text"] for p in r["prompts"]]
    # re-probing finished checkpoints only: the same answers; nothing to reuse: refused at once
    from training.evaluate import eval_preset, run_eval
    ec = eval_preset("smoke")
    ec.seeds = (0, 1)
    r3 = run_eval(tmp_path / "run", ec, results=tmp_path / "r3.json", preset="smoke", reuse_only=True)
    assert [p["fetched-int8"]["text"] for p in r3["prompts"]] == \
        [p["fetched-int8"]["text"] for p in r["prompts"]]
    with pytest.raises(ValueError, match="no checkpoints"):
        run_eval(tmp_path / "empty", eval_preset("smoke"), reuse_only=True)


def test_eval_refuses_a_corpus_that_contains_the_template(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "The atomic number of Gold is 79."}\n')
    with pytest.raises(SystemExit):
        main(["eval", "--preset", "smoke", "--out", str(tmp_path / "run"), "--corpus", str(corpus),
              "--heldout", str(corpus)])
    assert "contains the probe's template" in capsys.readouterr().err


def test_eval_rejects_bad_seeds_and_corpus_overrides(tmp_path, capsys):
    for argv, message in ((["--seeds", "0,x"], "--seeds takes comma-separated integers"),
                          (["--set", "corpus.nope=1"], "bad corpus override"),
                          (["--set", "corpus.seed=1"], "seeds: --seeds"),
                          (["--set", "corpus.min_docs=two"], "is not a number")):
        with pytest.raises(SystemExit):
            main(["eval", "--preset", "smoke", "--out", str(tmp_path / "run"), *argv])
        assert message in capsys.readouterr().err
