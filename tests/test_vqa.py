"""VQA accuracy as the official VQA evaluation defines it, and `evaluate` on a real-format VQA file
(VQAv2 / TextVQA / ChartQA field layouts) through data_prep.vqa."""

import json
from dataclasses import replace

import pytest

from nemo_pixellm.vqa_score import normalize_answer, vqa_score


def test_vqa_accuracy_follows_the_official_definition():
    # ten annotators: min(1, agreeing others / 3) averaged over the ten leave-one-out subsets
    others = ["cat"] * 10
    for agreeing, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["dog"] * agreeing + others[agreeing:]
        assert vqa_score("dog", answers) == pytest.approx(expected, abs=1e-12)
    # one or two reference answers (ChartQA, DocVQA): exact match with any
    assert vqa_score("1999", ["1999.", "21 May 1999"]) == 1.0 and vqa_score("1998", ["1999"]) == 0.0
    # the official normalisation: case, punctuation, number words, articles, thousands separators, decimals
    assert [normalize_answer(a) for a in ["Two", "the Red.", "1,000", "3.5", "an apple!", "yes\n"]] == \
        ["2", "red", "1000", "3.5", "apple", "yes"]


@pytest.mark.slow
def test_evaluate_reads_a_real_format_vqa_file(trained_checkpoint, cache_dir, tmp_path, monkeypatch, capsys):
    """The held-out synthetic scenes written out as image files with a JSONL in three exports' layouts:
    evaluate on data_prep.vqa's shards asks the same questions and gets the same answers as on the
    checkpoint's own held-out split, each scored by the VQA accuracy of its format."""
    from data_prep import vqa
    from nemo_pixellm import evaluate as evaluation
    from nemo_pixellm.data import sources
    from nemo_pixellm.data.shards import ShardReader

    monkeypatch.setenv("NEMO_PIXELLM_CACHE", str(cache_dir))
    model, data_config, _ = evaluation.load(str(trained_checkpoint))
    tokenizer = sources.load_tokenizer(data_config)
    heldout = ShardReader(sources.data_paths(data_config)[1])
    (tmp_path / "images").mkdir()
    rows, styles = [], []
    for k in range(4):
        record = heldout[k]
        (tmp_path / "images" / f"{k}.jpg").write_bytes(record["jpg"])
        for j, qa in enumerate(json.loads(record["json"])["qa"]):
            style = (k + j) % 3
            if style == 0:  # VQAv2: ten annotators, three of them right
                answers = [{"answer": a, "answer_id": i} for i, a in enumerate([qa["a"]] * 3 + ["zebra"] * 7)]
                rows.append({"question_id": len(rows), "image": f"{k}.jpg", "question": qa["q"], "answers": answers,
                             "multiple_choice_answer": qa["a"], "answer_type": qa["type"]})
            elif style == 1:  # TextVQA: answers as strings
                rows.append({"image": f"{k}.jpg", "question": qa["q"], "answers": [qa["a"]] * 10, "type": qa["type"]})
            else:  # ChartQA: one label
                rows.append({"imgname": f"{k}.jpg", "query": qa["q"], "label": qa["a"], "type": qa["type"]})
            styles.append(style)
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    vqa.main(["--input", str(tmp_path / "questions.jsonl"), "--images", str(tmp_path / "images"),
              "--out", str(tmp_path / "shards")])

    args = evaluation.EvalArgs(checkpoint=str(trained_checkpoint), samples=4, ema=False)
    own = evaluation.ask_questions(model, data_config, tokenizer, args)
    real = evaluation.ask_questions(model, data_config, tokenizer, replace(args, data=str(tmp_path / "shards")))
    assert [(r["q"], r["said"]) for r in real] == [(r["q"], r["said"]) for r in own] and len(real) == len(rows)
    full = {0: 0.9, 1: 1.0, 2: 1.0}  # the score of the right answer in each format
    right = [normalize_answer(r["said"]) == normalize_answer(r["a"]) for r in real]
    assert [r["score"] for r in real] == [full[s] * ok for s, ok in zip(styles, right)]

    evaluation.main([f"checkpoint={trained_checkpoint}", "samples=4", "ema=false", f"data={tmp_path / 'shards'}"])
    printed = capsys.readouterr().out
    report = json.loads(next(line for line in printed.splitlines() if line.startswith('{"checkpoint"')))
    with capsys.disabled():
        print(f"\n{sum(right)} of {len(real)} answers right; VQA accuracy {sum(r['score'] for r in real) / len(real):.3f}")
        print(printed[printed.index("type "):])
    assert report["data"] == str(tmp_path / "shards") and "caption_loss" not in report
    assert report["vqa"]["all"] == {"n": len(rows), "accuracy": pytest.approx(sum(r["score"] for r in real) / len(rows))}
