"""caption_perplexity (kenlm + hf backends) and the perplexity filter (global lowest fraction)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import curate
from curate import schema as S

# A bigram model with hand-picked log10 probabilities (KenLM does not check that they sum to one).
ARPA = """\\data\\
ngram 1=5
ngram 2=3

\\1-grams:
-1.0\t<unk>\t0
-99\t<s>\t-0.30103
-0.5\t</s>\t0
-0.30103\ta\t-0.2
-0.69897\tdog\t-0.1

\\2-grams:
-0.2\t<s> a
-0.4\ta dog
-0.1\tdog </s>

\\end\\
"""


def _pp(log10_sum: float, words: int) -> float:
    """CCNet: 10 ** (-log10 P / (words + 1)), the +1 being </s>."""
    return 10.0 ** (-log10_sum / (words + 1))


@pytest.fixture(scope="module")
def arpa(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "bigram.arpa"
    path.write_text(ARPA)
    return path


def test_kenlm_backend_matches_hand_computed_ccnet_perplexity(arpa):
    captions = [
        "a dog",           # <s> a: -0.2, a dog: -0.4, dog </s>: -0.1
        "  A  Dóg\n",      # CCNet normalisation: strip, lower, accents -> "a  dog" -> same as above
        "dog a",           # backoffs: b(<s>)+P(dog), b(dog)+P(a), b(a)+P(</s>)
        "a cat",           # OOV: P(a|<s>), b(a)+P(<unk>), P(</s>) after <unk>
        "",                # rejected: empty_caption
        "\x01\x02 \t",     # only control characters: nothing left after normalisation
        None,
    ]
    expected = [
        _pp(-0.2 - 0.4 - 0.1, 2),
        _pp(-0.2 - 0.4 - 0.1, 2),
        _pp((-0.30103 - 0.69897) + (-0.1 - 0.30103) + (-0.2 - 0.5), 2),
        _pp(-0.2 + (-0.2 - 1.0) - 0.5, 2),
    ]
    t = pa.table({"uid": [f"u{i}" for i in range(len(captions))], "caption": captions})
    stage = curate.create_stage("caption_perplexity", backend="kenlm", model=str(arpa))
    out = stage(t).table
    got = out[S.CAPTION_PERPLEXITY].to_pylist()
    for g, e in zip(got[:4], expected):
        assert g == pytest.approx(e, rel=2e-6)
    assert expected[0] == pytest.approx(10 ** (0.7 / 3), rel=1e-12)
    assert got[4:] == [None, None, None]
    assert out[S.REJECT_REASON].to_pylist() == [None] * 4 + ["empty_caption"] * 3
    assert stage.describe()["order"] == 2


def test_ccnet_normalizer_reference_cases():
    from curate.stages.perplexity_kenlm import ccnet_normalize

    # the vectors of cc_net's own tests/test_normalizer.py
    weird = "，。、„”“«»１」「《》´∶：？！（）；–—．～’…━〈〉【】％"
    assert ccnet_normalize(weird, case=False, accent=False, numbers=False) == \
        ',.,""""""""""\'::?!();- - . ~\'...-<>[]%'
    assert ccnet_normalize("０２３４５６７８９ | 0123456789") == "000000000 | 0000000000"
    assert ccnet_normalize("  Ça VA\tÉté\n") == "ca vaete"  # tab/newline are control chars: deleted


def test_kenlm_with_sentencepiece(tmp_path):
    """CCNet scores SentencePiece pieces: the stage tokenises with the sp model before KenLM."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a dog runs on the beach", "the cat sleeps", "a red car on the road"] * 30))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=30,
                                   model_type="bpe", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    pieces = sp.encode_as_pieces("a dog runs")
    assert len(pieces) >= 3
    uniq = sorted(set(pieces))
    logp = {p: -0.1 * (i + 1) for i, p in enumerate(uniq)}
    # unigram probabilities (+ one unused bigram: KenLM needs order >= 2); every backoff weight is 0
    lines = ["\\data\\", f"ngram 1={len(uniq) + 3}", "ngram 2=1", "", "\\1-grams:", "-2.0\t<unk>",
             "-99\t<s>\t0", "-0.25\t</s>"]
    lines += [f"{v}\t{p}\t0" for p, v in logp.items()] + ["", "\\2-grams:", "-1.5\t<s> </s>", "", "\\end\\", ""]
    (tmp_path / "sp.arpa").write_text("\n".join(lines))
    stage = curate.create_stage("caption_perplexity", backend="kenlm", model=str(tmp_path / "sp.arpa"),
                                sp_model=str(tmp_path / "sp.model"))
    got = stage(pa.table({"uid": ["x"], "caption": ["A Dog Runs"]})).table[S.CAPTION_PERPLEXITY][0].as_py()
    assert got == pytest.approx(_pp(sum(logp[p] for p in pieces) - 0.25, len(pieces)), rel=2e-6)


def test_kenlm_config_errors(tmp_path):
    from curate.stage import StageError

    with pytest.raises(ValueError, match="needs `model`"):
        curate.create_stage("caption_perplexity", backend="kenlm")
    with pytest.raises(StageError, match="does not exist"):
        curate.create_stage("caption_perplexity", backend="kenlm", model=str(tmp_path / "nope.arpa")).setup()


CAPTIONS = ["a dog", "A photograph of an astronaut in a white space suit holding a flag, 1984.",
            "cat", "the the the the the the", "Ein Hund läuft am Strand entlang", "qzx vvk",
            "a red car parked on a narrow street in the old town at night with lights"]


@pytest.fixture(scope="module")
def hf_stage():
    stage = curate.create_stage("caption_perplexity", lm_batch_size=64)
    stage.ensure_setup()
    return stage


def _reference_ppl(model, tok, caption: str, prompt: str | None = None) -> float:
    """exp(mean NLL) of the caption tokens after <bos> [+ prompt], computed independently, one text at a time."""
    import torch

    prefix = [tok.bos_token_id] + (tok(prompt, add_special_tokens=False)["input_ids"] if prompt else [])
    cap = tok((" " if prompt else "") + caption, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prefix + cap])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    nll = [-logp[len(prefix) + j - 1, t].item() for j, t in enumerate(cap)]
    return math.exp(sum(nll) / len(nll))


def test_hf_backend_batched_equals_one_by_one_and_reference(hf_stage):
    t = pa.table({"uid": [f"u{i}" for i in range(len(CAPTIONS))], "caption": CAPTIONS})
    batched = hf_stage(t).table[S.CAPTION_PERPLEXITY].to_numpy()
    scorer = hf_stage.scorer
    one = np.array([scorer.score([c])[0] for c in CAPTIONS])
    # padding invariance: each caption next to the longest one
    padded = np.array([scorer.score([c, CAPTIONS[-1] * 3])[0] for c in CAPTIONS])
    ref = np.array([_reference_ppl(scorer.model, scorer.tokenizer, c) for c in CAPTIONS])
    # float64 on the CPU (dtype auto): the stored float32 values are identical bit for bit
    assert batched.dtype == np.float32
    np.testing.assert_array_equal(batched, one.astype(np.float32))
    np.testing.assert_array_equal(padded.astype(np.float32), one.astype(np.float32))
    np.testing.assert_allclose(one, ref, rtol=1e-9)
    assert len(set(np.round(batched, 2))) == len(CAPTIONS)  # the random model still tells captions apart
    info = hf_stage.describe()
    assert "RANDOM WEIGHTS" in info["warning"] and info["device"] == "cpu" and info["dtype"] == "float64"


def test_hf_prompt_conditioning_excludes_prompt_tokens(hf_stage):
    prompt = "An image caption:"
    stage = curate.create_stage("caption_perplexity", prompt=prompt)
    t = pa.table({"uid": ["a", "b", "c"], "caption": CAPTIONS[:3]})
    got = stage(t).table[S.CAPTION_PERPLEXITY].to_numpy()
    ref = [_reference_ppl(stage.scorer.model, stage.scorer.tokenizer, c, prompt) for c in CAPTIONS[:3]]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    plain = hf_stage(t).table[S.CAPTION_PERPLEXITY].to_numpy()
    assert not np.allclose(got, plain)


def test_hf_model_loads_from_local_directory(hf_stage, tmp_path):
    """The real loading path (AutoModelForCausalLM/AutoTokenizer.from_pretrained) on a saved model."""
    from curate.stages.hf_models import random_causal_lm

    model, tok = random_causal_lm("tiny", seed=0)
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    stage = curate.create_stage("caption_perplexity", model=str(tmp_path / "lm"), max_batch_tokens=64)
    t = pa.table({"uid": [f"u{i}" for i in range(len(CAPTIONS))], "caption": CAPTIONS})
    np.testing.assert_array_equal(stage(t).table[S.CAPTION_PERPLEXITY].to_numpy(),
                                  hf_stage(t).table[S.CAPTION_PERPLEXITY].to_numpy())
    assert "warning" not in stage.describe() and stage.describe()["model"] == str(tmp_path / "lm")


def test_hf_empty_captions_rejected(hf_stage):
    t = pa.table({"uid": ["a", "b", "c", "d"], "caption": ["a dog", " \n\t", None, ""]})
    out = hf_stage(t).table
    assert out[S.REJECT_REASON].to_pylist() == [None, "empty_caption", "empty_caption", "empty_caption"]
    assert out[S.CAPTION_PERPLEXITY][0].as_py() > 1


# -- the perplexity filter ---------------------------------------------------------------------------------------

def _corpus(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ppl = rng.lognormal(5, 1.5, n).astype(np.float32)
    ppl[rng.choice(n, n // 10, replace=False)] = np.float32(300.0)  # ties (identical captions)
    ppl[:3] = [np.float32(1.0), np.float32(np.inf), np.float32(300.0)]
    vals = pa.array(ppl, pa.float32())
    null = rng.random(n) < 0.02
    vals = pc.if_else(pa.array(null), pa.nulls(n, pa.float32()), vals)
    rejected = rng.random(n) < 0.1
    return pa.table({"uid": [f"r{i:05d}" for i in range(n)], "caption": ["c"] * n, S.CAPTION_PERPLEXITY: vals,
                     S.REJECT_REASON: pa.array([("earlier" if r else None) for r in rejected], pa.string()),
                     S.REJECT_STAGE: pa.array([("x" if r else None) for r in rejected], pa.string()),
                     S.REJECT_DETAIL: pa.nulls(n, pa.string()), S.ERROR_TYPE: pa.nulls(n, pa.string())})


def _expected(table: pa.Table, fraction: float | None, lo: float | None, hi: float | None) -> set[str]:
    x = table[S.CAPTION_PERPLEXITY].to_numpy(zero_copy_only=False).astype(np.float32)
    active = table[S.REJECT_REASON].is_null().to_numpy(zero_copy_only=False)
    ok = active & ~np.isnan(x)
    if fraction is not None:  # the lowest floor(f * N) of every active row with a perplexity, ties kept
        k = int(np.floor(fraction * ok.sum()))
        t = np.sort(x[ok])[k - 1] if k else -np.inf
        ok &= x <= t
    if lo is not None:
        ok &= x >= np.float32(lo)
    if hi is not None:
        ok &= x <= np.float32(hi)
    uids = np.array(table["uid"].to_pylist())
    return set(uids[ok])


def _run_filter(shards: list[pa.Table], tmp_path, runner: str, **params) -> set[str]:
    from curate.context import FitContext

    paths = []
    for i, t in enumerate(shards):
        paths.append(str(tmp_path / f"shard{i}.parquet"))
        pq.write_table(t, paths[-1])
    stage = curate.create_stage("perplexity", **params)
    ctx = FitContext(paths, tmp_path / "state", runner=runner, parallelism=2, total_rows=sum(len(t) for t in shards))
    ctx.work_dir.mkdir(exist_ok=True)
    stage.set_state(stage.fit(ctx))
    kept = set()
    for t in shards:
        out = stage.run_batch(t)
        newly = pc.equal(pc.fill_null(out[S.REJECT_STAGE], ""), "perplexity")
        gone = out.filter(newly)
        for reason, v in zip(gone[S.REJECT_REASON].to_pylist(), gone[S.CAPTION_PERPLEXITY].to_pylist()):
            low = params.get("min_perplexity") is not None and v is not None and v < params["min_perplexity"]
            assert reason == ("perplexity_too_low" if low else "perplexity_too_high"), (reason, v)
        kept |= set(out.filter(pc.is_null(out[S.REJECT_REASON]))["uid"].to_pylist())
    return kept


@pytest.mark.parametrize("params", [
    {"keep_fraction": 0.5}, {"keep_fraction": 0.6, "min_perplexity": 10, "max_perplexity": 200},
    {"min_perplexity": 50, "max_perplexity": 300}, {"keep_fraction": 1.0}, {"keep_fraction": 0.0001},
])
def test_filter_global_fraction_across_shards_matches_numpy(tmp_path, params):
    full = _corpus(5000, seed=1)
    shards = [full.slice(0, 700), full.slice(700, 2300), full.slice(3000, 2000)]  # uneven shards
    got = _run_filter(shards, tmp_path, "local", **params)
    assert got == _expected(full, params.get("keep_fraction"), params.get("min_perplexity"),
                            params.get("max_perplexity"))
    if params.get("keep_fraction") == 0.5:  # per-shard fractions would give another set
        per_shard = set().union(*(_expected(s, 0.5, None, None) for s in shards))
        assert per_shard != got


def test_filter_params_validation():
    with pytest.raises(ValueError):
        curate.create_stage("perplexity")
    with pytest.raises(ValueError):
        curate.create_stage("perplexity", min_perplexity=10, max_perplexity=1)


@pytest.mark.ray
def test_filter_fit_under_ray_tasks(tmp_path, ray_cluster):
    full = _corpus(3000, seed=2)
    shards = [full.slice(i, 500) for i in range(0, 3000, 500)]
    assert _run_filter(shards, tmp_path, "ray", keep_fraction=0.25) == _expected(full, 0.25, None, None)


def _pipeline(tmp_path, runner: str, captions_path) -> curate.pipeline.RunResult:
    return curate.run({
        "input": {"path": str(captions_path), "url_col": "url", "caption_col": "caption", "shard_size": 40},
        "output": {"path": str(tmp_path / runner)},
        "runner": {"kind": runner, "num_cpus": 2},
        "stages": [{"stage": "caption_perplexity", "batch_size": 32},
                   {"stage": "perplexity", "keep_fraction": 0.6, "max_perplexity": 1e12}],
    })


@pytest.mark.ray
def test_pipeline_local_and_ray_agree_with_numpy(tmp_path, ray_cluster):
    from helpers import read_dir, rows_by_uid

    words = "a dog cat red car beach street photo of the on in with night old town flag".split()
    rng = np.random.default_rng(0)
    caps = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(150)] + ["", "  ", None] + ["a dog"] * 5
    src = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(len(caps))], "caption": caps}), src)
    results = {r: _pipeline(tmp_path, r, src) for r in ("local", "ray")}
    for sub in ("data", "rejected"):
        local, ray = (rows_by_uid(read_dir(results[r].output / sub)) for r in ("local", "ray"))
        assert local == ray
    rows = read_dir(results["local"].output / "data").to_pylist() + \
        read_dir(results["local"].output / "rejected").to_pylist()
    scored = [r for r in rows if r["reject_reason"] not in ("empty_caption", "missing_caption")]
    assert sum(r["reject_reason"] == "empty_caption" for r in rows) == 2  # "" and "  " (None: ingest's reason)
    x = np.array([r[S.CAPTION_PERPLEXITY] for r in scored], np.float32)
    t = np.sort(x)[int(np.floor(0.6 * len(x))) - 1]
    kept = {r["uid"] for r in scored if r["reject_reason"] is None}
    assert kept == {r["uid"] for r in scored if r[S.CAPTION_PERPLEXITY] <= t}
    stages = {s["id"]: s for s in results["local"].stats["stages"]}
    assert stages["perplexity"]["info"]["k"] == int(np.floor(0.6 * len(x)))
    ray_stages = {s["id"]: s for s in results["ray"].stats["stages"]}
    assert "RANDOM WEIGHTS" in ray_stages["caption_perplexity"]["info"]["warning"]
