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


@pytest.mark.slow
def test_generate_on_a_drawn_scene_answers_as_evaluate_does(trained_checkpoint, cache_dir, tmp_path, monkeypatch, capsys):
    """A synthetic scene (known answers) drawn by the test and saved as PNG: `generate` with the image file and
    each of its questions gives evaluate's answer to the same question on the same picture; a 1000x300 photo-like
    image is tiled by the rule and answered; the tokens/s figure is printed."""
    import numpy as np
    from PIL import Image

    from nemo_pixellm import evaluate as evaluation
    from nemo_pixellm import tiling
    from nemo_pixellm.data import sources
    from nemo_pixellm.data.shards import write_shards
    from nemo_pixellm.data.synthetic import render_scene
    from nemo_pixellm.generate import GenerateArgs, open_request_image, prompt_from_request, run

    monkeypatch.setenv("NEMO_PIXELLM_CACHE", str(cache_dir))
    model, data_config, _ = evaluation.load(str(trained_checkpoint))
    scene = render_scene(seed=4321, index=3, size=data_config.image_size * 2)
    scene.image.save(tmp_path / "scene.png")
    png = (tmp_path / "scene.png").read_bytes()
    write_shards([{"__key__": "scene", "jpg": png, "json": json.dumps({"qa": scene.qa}).encode()}], tmp_path / "shards",
                 shard_size=1)
    asked = evaluation.ask_questions(model, data_config, sources.load_tokenizer(data_config),
                                     evaluation.EvalArgs(checkpoint=str(trained_checkpoint), samples=1,
                                                         data=str(tmp_path / "shards")))
    (tmp_path / "asks.jsonl").write_text("".join(json.dumps({"prompt": qa["q"], "images": [str(tmp_path / "scene.png")]})
                                                 + "\n" for qa in scene.qa))
    said = run(GenerateArgs(checkpoint=str(trained_checkpoint), requests=str(tmp_path / "asks.jsonl"),
                            max_new_tokens=6, ema=False))
    assert said == [r["said"] for r in asked] and len(said) == len(scene.qa) >= 3
    right = sum(r["score"] for r in asked)
    assert "tokens/s" in capsys.readouterr().err

    rng = np.random.default_rng(0)  # a photo-like wide picture: smooth gradients and noise
    x = np.linspace(0, 1, 1000)[None, :, None]
    y = np.linspace(0, 1, 300)[:, None, None]
    photo = (255 * np.clip(np.concatenate(np.broadcast_arrays(x, y, 1 - x * y), -1) + 0.05 * rng.standard_normal((300, 1000, 3)), 0, 1))
    Image.fromarray(photo.astype(np.uint8)).save(tmp_path / "photo.jpg")
    prompt = prompt_from_request(sources.load_tokenizer(data_config), "What is in the picture?",
                                 [open_request_image(str(tmp_path / "photo.jpg"))], data_config)
    layout = tiling.image_layout(1000, 300, tile=data_config.image_size, max_tiles=data_config.max_tiles)
    assert layout.grid == tiling.best_grid(1000, 300, data_config.image_size, data_config.max_tiles) == (4, 1)
    assert prompt.views.shape[0] == layout.views == 5 and prompt.tokens.count(model.image_token_id) == layout.tokens
    answer = run(GenerateArgs(checkpoint=str(trained_checkpoint), prompt="What is in the picture?",
                              image=str(tmp_path / "photo.jpg"), max_new_tokens=6, greedy=True, ema=False))
    printed = capsys.readouterr()
    assert printed.out.strip() == answer[0] and "tokens/s" in printed.err
    with capsys.disabled():
        print(f"\nscene: {len(said)} questions, generate = evaluate on each, {right:.0f} right; "
              f"1000x300 photo {layout.grid} tiles -> {answer[0]!r}; {printed.err.strip().splitlines()[-1]}")
