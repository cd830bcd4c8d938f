"""Unit tests of the data steps on plain dict batches, without Ray (STYLE.md rule 7)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from aquila_ray.data.shards import read_token_shard
from aquila_ray.errors import ConfigError
from data_pipeline import synthetic
from data_pipeline.config import (
    ChineseQualityConfig,
    DataConfig,
    DedupConfig,
    DomainConfig,
    DomainTagConfig,
    EnglishQualityConfig,
    LanguageConfig,
    NormalizeConfig,
    QualityConfig,
    SourceConfig,
    TokenizerConfig,
    ToxicConfig,
    load_data_config,
    sample_config,
    sources_from_inputs,
)
from data_pipeline.dedup import DedupSignature, MinHasher, find_duplicates, jaccard
from data_pipeline.mixing import assign_split, copies_for, mixing_rates
from data_pipeline.output import Output
from data_pipeline.packing import pack, pack_group
from data_pipeline.readers import COLUMNS, InputFile, html_to_text, read_file
from data_pipeline.run import build_stats
from data_pipeline.steps import (
    DomainFilter,
    DomainTagger,
    LanguageId,
    Normalize,
    Quality,
    StepChain,
    Toxic,
    chinese_quality,
    english_quality,
)
from data_pipeline.tokenizer import Tokenize, save_tokenizer, train_tokenizer


def batch_of(texts: list[str], **cols: list) -> dict[str, list]:
    n = len(texts)
    b = {c: [""] * n for c in COLUMNS}
    b.update(order=list(range(n)), id=[str(i) for i in range(n)], source=["s"] * n, text=list(texts),
             nbytes=[len(t) for t in texts], lang_score=[0.0] * n)
    b.update(cols)
    return b


RNG = random.Random(0)
EN = [synthetic.en_doc(RNG) for _ in range(4)]
ZH = [synthetic.zh_doc(RNG) for _ in range(4)]


# ------------------------------------------------------------------------------------------------ readers
def test_reader_counts_every_bad_record(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl.gz"
    lines = [b'{"text": "ok", "id": 7, "url": "http://x.org"}', b"{broken", b'{"text": null}', b'{"text": 3}',
             b'{"text": ""}', b'{"text": "\xff\xfe"}', b"[1]", b"", json.dumps({"text": "x" * 50}).encode()]
    with gzip.open(p, "wb") as fh:
        fh.write(b"\n".join(lines))
    batches = list(read_file(InputFile(str(p), "s", 3, "jsonl"), max_doc_bytes=20))
    reasons = [r for b in batches for r in b["reason"]]
    assert reasons == ["", "read.broken_json", "read.missing_text", "read.text_not_string", "read.empty_text",
                       "read.invalid_utf8", "read.not_an_object", "read.too_large"]
    b = batches[0]
    assert b["id"][0] == "7" and b["url"][0] == "http://x.org" and b["order"][0] == (3 << 32)
    missing = list(read_file(InputFile("nope/*.jsonl", "s", 0, "missing", missing=True), 100))
    assert missing[0]["reason"] == ["read.missing_file"]


def test_reader_truncated_gzip_is_a_record(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl.gz"
    data = gzip.compress(b"\n".join(json.dumps({"text": f"doc {i}"}).encode() for i in range(2000)))
    p.write_bytes(data[: len(data) // 2])
    reasons = [r for b in read_file(InputFile(str(p), "s", 0, "jsonl"), 1000) for r in b["reason"]]
    assert reasons[-1] == "read.unreadable_file" and set(reasons[:-1]) == {""}


def test_html_to_text() -> None:
    html = "<html><head><style>p{}</style></head><body><h1>Title</h1><p>One &amp; two</p><script>x</script>" \
           "<div>three   four</div></body></html>"
    assert html_to_text(html) == "Title\nOne & two\nthree four"


# ------------------------------------------------------------------------------------------------ steps
def test_normalize_nfkc_and_empty() -> None:
    step = Normalize(NormalizeConfig())
    out = step(batch_of(["ＡＢＣ１２３\r\nx", "\u200b  "]))
    assert out["text"][0] == "ABC123\nx"
    assert out["reason"] == ["", "normalize.empty_after_normalize"]
    assert step.counts == {"in": 2, "kept": 1, "dropped.normalize.empty_after_normalize": 1}


def test_language_id_offline_and_t2s() -> None:
    step = LanguageId(LanguageConfig(keep=["zh", "en"]), NormalizeConfig(traditional_to_simplified=True))
    de = synthetic.other_doc(random.Random(1), "de")
    out = step(batch_of([EN[0], ZH[0], de, "這是一個關於電腦軟體與網路服務的繁體中文句子，說明系統設定。"]))
    assert out["lang"][:3] == ["en", "zh", "de"]
    assert out["reason"] == ["", "", "lang.not_kept", ""]
    assert out["text"][3].startswith("这是一个关于电脑软体")


def test_already_dropped_records_pass_untouched() -> None:
    step = Quality(QualityConfig())
    out = step(batch_of(["short"], lang=["en"], reason=["read.broken_json"]))
    assert out["reason"] == ["read.broken_json"] and step.counts["in"] == 0


@pytest.mark.parametrize("text,reason", [
    (EN[0], ""),
    ("one two three", "en_too_few_words"),
    ("# " * 60 + EN[1], "en_symbol_ratio"),
    ("\n".join("• " + s for s in EN[2].replace("\n", " ").split(". ")), "en_bullet_lines"),
    ("\n".join(EN[3].splitlines() * 3), "en_dup_lines"),
])
def test_english_quality(text: str, reason: str) -> None:
    assert english_quality(text, EnglishQualityConfig()) == reason


@pytest.mark.parametrize("text,reason", [
    (ZH[0], ""),
    ("太短了。", "zh_too_short"),
    ("\n".join(ZH[1][i:i + 5] for i in range(0, 300, 5)), "zh_short_lines"),
    ("This is mostly English text with only 一点中文 in it. " * 10, "zh_low_cjk"),
    (ZH[2][:40] * 10, "zh_repetitive"),
])
def test_chinese_quality(text: str, reason: str) -> None:
    assert chinese_quality(text, ChineseQualityConfig()) == reason


def test_toxic_words_phrases_and_zh_substrings(tmp_path: Path) -> None:
    (tmp_path / "en.txt").write_text("# c\nbad\ntwo words\n")
    (tmp_path / "zh.txt").write_text("色情网站\n")
    step = Toxic(ToxicConfig(term_files={"en": str(tmp_path / "en.txt"), "zh": str(tmp_path / "zh.txt")}))
    texts = ["a Bad day", "badge is fine", "two  words here", "打开色情网站", "正常的句子"]
    out = step(batch_of(texts, lang=["en", "en", "en", "zh", "zh"]))
    assert out["reason"] == ["toxic.terms", "", "toxic.terms", "toxic.terms", ""]


def test_domain_filter() -> None:
    step = DomainFilter(DomainConfig(blocked_domains=["spam.example"], blocked_url_substrings=["/casino/"]))
    urls = ["https://www.spam.example/a", "https://notspam.example/a", "http://x.org/casino/1", ""]
    out = step(batch_of(["t"] * 4, url=urls))
    assert out["reason"] == ["domain.blocked", "", "domain.url_pattern", ""]


def test_domain_tags_source_then_host_then_keywords_then_default() -> None:
    cfg = DomainTagConfig(sources={"wiki": "encyclopedia"}, hosts={"example.org": "news", "sub.example.org": "code"},
                          keywords={"academic": [r"\babstract\b", "摘要", r"\bet al\."], "code": [r"\bdef \w+\("]},
                          min_keyword_hits=2, keyword_chars=60)
    step = DomainTagger(cfg)
    texts = ["Abstract: as shown by Smith et al. in 2020",  # wiki source wins over everything
             "plain text",  # host suffix: a.example.org -> example.org
             "plain text",  # the longest suffix wins
             "Abstract: as shown by Smith et al. in 2020",  # two academic patterns, no URL
             "本文摘要：我们研究了 (abstract) 的方法",  # zh keyword + en keyword
             "Abstract only once",  # one hit < min_keyword_hits
             "x" * 60 + " abstract et al.",  # the hits lie beyond keyword_chars
             "Abstract, et al.",  # already dropped: no tag, not counted
             "see https://sub.example.org.evil.com/ abstract et al."]  # a URL in the text is not the record's URL
    urls = ["https://en.example.org/x", "https://a.example.org/x", "http://x.sub.example.org/y", "", "", "",
            "", "", "ftp://evil.com"]
    sources = ["wiki"] + ["web"] * 8
    reasons = [""] * 7 + ["quality.en_too_few_words", ""]
    out = step(batch_of(texts, url=urls, source=sources, reason=reasons))
    assert out["domain"] == ["encyclopedia", "news", "code", "academic", "academic", "general", "general", "",
                             "academic"]
    assert out["reason"] == reasons  # a tag, not a filter
    assert step.counts == {"in": 8, "kept": 8, "tagged.encyclopedia": 1, "tagged.news": 1, "tagged.code": 1,
                           "tagged.academic": 3, "tagged.general": 2}


def test_domain_tags_ties_go_to_the_first_domain_and_defaults_cover_common_hosts() -> None:
    step = DomainTagger(DomainTagConfig(keywords={"a": ["x", "y"], "b": ["y", "z"]}, min_keyword_hits=1))
    assert step.domain_of("s", "", "x y z") == "a"
    assert step.domain_of("s", "", "z") == "b"
    default = DomainTagger(DomainTagConfig())
    got = {u: default.domain_of("s", u, "") for u in ["https://zh.wikipedia.org/wiki/A", "github.com/x/y",
                                                     "https://arxiv.org/abs/1", "https://www.nasa.gov/",
                                                     "http://www.moe.gov.cn/", "https://cs.stanford.edu/",
                                                     "https://notwikipedia.org/", "not a url"]}
    assert got == {"https://zh.wikipedia.org/wiki/A": "encyclopedia", "github.com/x/y": "code",
                   "https://arxiv.org/abs/1": "academic", "https://www.nasa.gov/": "government",
                   "http://www.moe.gov.cn/": "government", "https://cs.stanford.edu/": "academic",
                   "https://notwikipedia.org/": "general", "not a url": "general"}
    code = "import os\n\ndef main(argv):\n    return run(argv);\n"
    assert default.domain_of("s", "", code) == "code"
    assert default.domain_of("s", "", "新华社北京3月5日电（记者张三）今天召开会议。") == "news"


def test_domain_tag_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"domain.tags.keywords.code='\(' is not valid; not a regular expression"):
        DomainTagConfig(keywords={"code": ["("]})
    with pytest.raises(ConfigError, match=r"domain.tags.sources.a='my domain' is not valid; expected a non-empty"):
        DomainTagConfig(sources={"a": "my domain"})
    with pytest.raises(ConfigError, match=r"domain.tags.min_keyword_hits=0 is not valid; expected >= 1"):
        load_data_config(overrides=["domain.tags.min_keyword_hits=0"])
    overlay = tmp_path / "c.yaml"
    overlay.write_text("domain:\n  tags:\n    hosts: {.Example.COM: shop, github.com: forge}\n")
    hosts = load_data_config(str(overlay)).domain.tags.hosts  # a --config overlay adds to the defaults
    assert (hosts["example.com"], hosts["github.com"], hosts["arxiv.org"]) == ("shop", "forge", "academic")
    assert load_data_config(overrides=["domain.tags.hosts={a.org: x}"]).domain.tags.hosts == {"a.org": "x"}


# ------------------------------------------------------------------------------------------------ dedup
def test_minhash_estimates_jaccard() -> None:
    h = MinHasher(DedupConfig())
    a = EN[0]
    b = synthetic.near_duplicate(a, random.Random(3))
    est = float(np.mean(h.signature(a) == h.signature(b)))
    assert abs(est - jaccard(a, b, 5)) < 0.1
    assert float(np.mean(h.signature(a) == h.signature(EN[1]))) < 0.3


def test_find_duplicates_exact_and_near_keeps_smallest_order() -> None:
    cfg = DedupConfig()
    texts = [EN[0], EN[1], EN[0].upper(), synthetic.near_duplicate(EN[1], random.Random(0)), ZH[0],
             synthetic.near_duplicate(ZH[0], random.Random(0)), EN[2]]
    out = DedupSignature(cfg)(batch_of(texts))
    order = np.array([10, 11, 12, 13, 14, 9, 20])  # the zh near duplicate comes first in order
    dups = find_duplicates(order, out["exact_hash"], out["signature"], cfg)
    assert dups == {12: "dedup.exact", 13: "dedup.near", 14: "dedup.near"}


# ------------------------------------------------------------------------------------------------ mixing
def test_mixing_rates_and_copies() -> None:
    assert mixing_rates({"a": 10, "b": 30}, {"a": None, "b": None}) == {"a": 1.0, "b": 1.0}
    rates = mixing_rates({"a": 10, "b": 30}, {"a": 1.0, "b": 1.0})
    assert rates == {"a": 2.0, "b": 2 / 3}
    copies = [copies_for(o, 0, rates["b"]) for o in range(3000)]
    assert set(copies) == {0, 1} and abs(np.mean(copies) - 2 / 3) < 0.03
    assert [copies_for(o, 0, 2.0) for o in range(5)] == [2] * 5
    splits = [assign_split(o, 0, 0.1) for o in range(5000)]
    assert abs(splits.count("validation") / 5000 - 0.1) < 0.02
    assert splits == [assign_split(o, 0, 0.1) for o in range(5000)]  # deterministic


# ------------------------------------------------------------------------------------------------ tokenizer + pack
def test_tokenizer_roundtrip_and_pack(tmp_path: Path) -> None:
    cfg = TokenizerConfig(vocab_size=400)
    tok = train_tokenizer(EN + ZH, cfg)
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    step = Tokenize(str(path), cfg.eos_token)
    texts = [EN[0], ZH[0], "digits 12345 ok"]
    out = step({"text": texts, "order": [0, 1, 2]})
    eos = tok.token_to_id(cfg.eos_token)
    for t, ids in zip(texts, out["ids"], strict=True):
        assert ids[-1] == eos and tok.decode(ids[:-1].tolist()) == t
    assert "text" not in out and list(out["nchars"]) == [len(t) for t in texts]
    seqs = pack(list(out["ids"]), seq_len=16, pad_id=eos)
    assert seqs.shape[1] == 17
    stream = seqs.reshape(-1)
    assert np.array_equal(stream[: sum(a.size for a in out["ids"])], np.concatenate(out["ids"]))


def test_pack_group_orders_by_copy_then_order(tmp_path: Path) -> None:
    import pyarrow as pa

    schema = pa.schema([("order", pa.int64()), ("source", pa.string()), ("copies", pa.int32()),
                        ("ids", pa.list_(pa.uint32()))])
    a = pa.table({"order": [5], "source": ["a"], "copies": [2], "ids": [[1, 2, 0]]}, schema=schema)
    b = pa.table({"order": [1, 9], "source": ["b", "b"], "copies": [1, 0], "ids": [[3, 0], [7, 0]]}, schema=schema)
    group = pa.concat_tables([a, b])  # two chunks, as a map_groups batch may hold
    r = pack_group(group, 3, 0, Output(tmp_path), "s.arrow")
    assert r["tokens_per_source"] == {"a": 6, "b": 2} and r["num_sequences"] == 2 and r["num_padding"] == 0
    assert read_token_shard(tmp_path / "s.arrow").reshape(-1).tolist() == [3, 0, 1, 2, 0, 1, 2, 0]
    (tmp_path / "s.arrow").write_bytes(b"kept")  # a finished shard is counted again, not rewritten
    assert pack_group(group, 3, 0, Output(tmp_path), "s.arrow")["num_sequences"] == 2
    assert (tmp_path / "s.arrow").read_bytes() == b"kept"


def test_stats_balance() -> None:
    from collections import Counter

    counts = Counter({("a", "en", ""): 5, ("a", "", "read.broken_json"): 2, ("b", "zh", "dedup.near"): 1,
                      ("b", "de", "lang.not_kept"): 3})
    s = build_stats(counts)
    assert s["total"] == {"in": 11, "kept": 5, "dropped": 4, "invalid": 2} and s["balanced"]
    steps = {x["step"]: x for x in s["steps"]}
    assert steps["lang"]["in"] == 9 and steps["lang"]["kept"] == 6 and steps["dedup"]["kept"] == 5
    assert s["by_source"]["b"]["dropped"] == {"dedup.near": 1, "lang.not_kept": 3}


def test_step_chain_runs_every_step() -> None:
    cfg = sample_config()
    chain = StepChain(cfg)
    out = chain(batch_of([EN[0], ZH[0]]))
    assert list(out["reason"]) == ["", ""] and out["signature"].shape == (2, 200)
    assert list(out["domain"]) == ["general", "general"]
    assert [s.name for s in chain.steps] == ["normalize", "lang", "quality", "toxic", "domain", "domain_tag",
                                             "signature"]
    off = StepChain(load_data_config(overrides=["domain.tags.enabled=false"]))
    assert "domain" not in off(batch_of([EN[0]])) and "domain_tag" not in [s.name for s in off.steps]


# ------------------------------------------------------------------------------------------------ config
def test_config_errors_name_field_value_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sources\[a\]\.weight=-1 is not valid; expected a number > 0"):
        SourceConfig("a", ["x"], weight=-1)
    with pytest.raises(ConfigError, match=r"dedup.threshold=1.5 is not valid"):
        load_data_config(overrides=["dedup.threshold=1.5"])
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['dedup.bands'\]"):
        load_data_config(overrides=["dedup.bands=3"])
    with pytest.raises(ConfigError, match="give every source a weight, or none"):
        DataConfig(sources=[SourceConfig("a", ["x"], weight=1.0), SourceConfig("b", ["y"])])
    bad = tmp_path / "c.yaml"
    bad.write_text("tokenizer:\n  eos_token: '<eos>'\n")
    with pytest.raises(ConfigError, match="tokenizer.eos_token='<eos>' is not valid; must be one of special"):
        load_data_config(str(bad))
    deep = tmp_path / "d.yaml"
    deep.write_text("quality:\n  en:\n    min_words: 10\n")
    cfg = load_data_config(str(deep))
    assert cfg.quality.en.min_words == 10 and cfg.quality.zh.min_chars == 200


def test_sources_from_inputs() -> None:
    srcs = sources_from_inputs(["web=data/*.jsonl", "data/wiki_zh.jsonl.gz", "x/y/*.parquet", "b/wiki_zh.json"])
    assert [s.name for s in srcs] == ["web", "wiki_zh", "y", "wiki_zh_2"]


# ------------------------------------------------------------------------------------------------ jobs
def test_prepare_data_job_dry_run_and_bad_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from jobs import prepare_data as job

    assert job.main(["--dry-run", "--output", str(tmp_path / "o"), "--set", "pack.seq_len=64"]) == 0
    out = capsys.readouterr().out
    assert '"seq_len": 64' in out and "zh_poetry.jsonl.gz" in out and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="pack.seq_len=0 is not valid"):
        job.main(["--output", str(tmp_path / "o"), "--set", "pack.seq_len=0"])
    assert not (tmp_path / "o").exists()  # nothing was started


def test_train_tokenizer_job(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from jobs import train_tokenizer as job

    src = tmp_path / "a.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in EN + ZH))
    out = tmp_path / "tok.json"
    assert job.main(["--input", str(src), "--output", str(out), "--set", "tokenizer.vocab_size=300"]) == 0
    assert Tokenizer.from_file(str(out)).get_vocab_size() == 300
