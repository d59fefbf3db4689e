"""data_prep builders: tiny fixture data sets in tmp_path -> shards read back with ShardReader.

Covers record contents against the inputs, bad records skipped and listed, resume after an
interruption, the same output with 1 and 2 workers, and clear errors for missing inputs.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from data_prep import coco, common, llava, preference, synthetic, text, vqa
from nemo_pixellm.data.shards import MANIFEST, ShardReader, write_shards
from nemo_pixellm.data.synthetic import scene_record


def gradient(size=(40, 30), alpha=False) -> Image.Image:
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    channels = [x, y, 255 - x] + ([np.where(x < 128, 0, 255)] if alpha else [])
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


def save(image: Image.Image, path, fmt) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path.read_bytes()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def read_back(out) -> list[tuple[dict, bytes | None]]:
    reader = ShardReader(out)
    samples = [reader[i] for i in range(len(reader))]
    return [(json.loads(s["json"]), s.get("jpg")) for s in samples]


def manifest_of(out) -> dict:
    return json.loads((out / MANIFEST).read_text())


def test_coco_one_sample_per_image_with_all_its_captions(tmp_path):
    images = tmp_path / "images"
    jpeg = save(gradient(), images / "a.jpg", "JPEG")
    save(gradient(), images / "sub" / "b.png", "PNG")
    save(gradient(alpha=True).convert("RGBA"), images / "c.png", "PNG")
    save(gradient(), images / "d.jpg", "JPEG")
    data = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "sub/b.png"},
                   {"id": 3, "file_name": "c.png"}, {"id": 4, "file_name": "d.jpg"}, {"file_name": "e.jpg"}],
        "annotations": [{"image_id": 1, "caption": "A red thing. "}, {"image_id": 2, "caption": "A blue thing."},
                        {"image_id": 1, "caption": "Another view.\n"}, {"image_id": 9, "caption": "Lost."},
                        {"image_id": 3, "caption": "Half clear."}, {"image_id": 2}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    manifest = coco.main(["--captions", str(tmp_path / "captions.json"), "--images", str(images), "--out", str(out),
                          "--shard-size", "2"])

    samples = read_back(out)
    assert [meta for meta, _ in samples] == [
        {"caption": "A red thing.", "captions": ["A red thing.", "Another view."], "image_id": 1, "file_name": "a.jpg"},
        {"caption": "A blue thing.", "captions": ["A blue thing."], "image_id": 2, "file_name": "sub/b.png"},
        {"caption": "Half clear.", "captions": ["Half clear."], "image_id": 3, "file_name": "c.png"},
    ]
    assert samples[0][1] == jpeg  # a JPEG is stored as it is
    assert Image.open(io.BytesIO(samples[1][1])).format == "JPEG"  # a PNG is re-encoded
    assert np.abs(pixels(samples[1][1]) - np.asarray(gradient(), dtype=np.float32)).mean() < 3
    transparent_half = pixels(samples[2][1])[:, :15]
    assert transparent_half.min() > 240  # transparency becomes white, not black
    assert manifest["samples"] == 3 and [s["samples"] for s in manifest["shards"]] == [2, 1]
    assert {(s["item"], s["reason"]) for s in manifest["skipped"]} == {
        ("images[4]", "image entry without an id and a file_name"),
        ("annotations[3]", "caption of unknown image id 9"),
        ("annotations[5]", "annotation without a caption"),
        ("images[3]", "image d.jpg has no captions"),
    }


def test_llava_conversations_are_kept_turn_by_turn(tmp_path):
    jpeg = save(gradient(), tmp_path / "coco" / "x.jpg", "JPEG")
    chat = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A gradient."},
            {"from": "human", "value": "Which colours?"}, {"from": "gpt", "value": "Red and blue."}]
    data = [
        {"id": "a", "image": "x.jpg", "conversations": chat},
        {"id": "b", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "c", "image": "x.jpg", "conversations": [{"from": "human", "value": "Colour?"},
                                                          {"from": "gpt", "value": "Red."}]},
        {"id": "d", "image": "x.jpg", "conversations": [{"from": "gpt", "value": "Hi"},
                                                          {"from": "human", "value": "?"}]},
        {"id": "e", "image": "x.jpg", "conversations": chat[:1] * 2 + chat[1:2] * 2},
        {"id": "f", "conversations": chat[:2]},
        "not an object",
        {"id": "g", "image": "x.jpg", "conversations": [{"from": "system", "value": "Be brief."}, *chat[:2]]},
        {"id": "h", "image": "x.jpg", "conversations": [{"from": "system", "value": "<image>"}, *chat[:2]]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    manifest = llava.main(["--data", str(tmp_path / "llava.json"), "--images", str(tmp_path / "coco"),
                           "--out", str(out)])

    samples = read_back(out)
    assert [meta for meta, _ in samples] == [
        {"id": "a", "image": "x.jpg", "conversations": chat},
        {"id": "b", "conversations": data[1]["conversations"]},
        {"id": "c", "image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                          {"from": "gpt", "value": "Red."}]},
        {"id": "g", "image": "x.jpg", "conversations": [{"from": "system", "value": "Be brief."}, *chat[:2]]},
    ]
    assert [jpg for _, jpg in samples] == [jpeg, None, jpeg, jpeg]
    assert {(s["item"], s["reason"]) for s in manifest["skipped"]} == {
        ("[3]", "turn 0 is not a human turn with a string value"),
        ("[4]", "turn 1 is not a gpt turn with a string value"),
        ("[5]", "<image> placeholder but no image"),
        ("[6]", "not a JSON object: not an object"),
        ("[8]", "<image> placeholder outside a human turn"),
    }


def test_text_jsonl_keeps_each_text_exactly(tmp_path):
    texts = ["Plain text.", "  Leading spaces and a\nnewline inside.", "Ünïcödé ✓ 文字"]
    lines = [json.dumps({"text": t}) for t in texts[:2]] + ["", "{not json", json.dumps({"body": "x"}),
                                                             json.dumps({"text": texts[2]}, ensure_ascii=False)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    manifest = text.main(["--input", str(tmp_path / "corpus.jsonl"), "--out", str(out)])

    assert read_back(out) == [({"text": t}, None) for t in texts]
    assert [s["item"] for s in manifest["skipped"]] == ["line 4", "line 5"]
    assert manifest["skipped"][0]["reason"].startswith("invalid JSON")
    assert manifest["skipped"][1]["reason"] == "field 'text' missing or not a non-empty string"


def preference_set(tmp_path) -> tuple:
    """RLAIF-V style pairs: five good ones, a corrupt JPEG, a missing image and a malformed line."""
    images = tmp_path / "images"
    good = save(gradient(), images / "good.jpg", "JPEG")
    (images / "corrupt.jpg").write_bytes(good[: len(good) // 2])  # a truncated JPEG
    save(gradient(), images / "diagram.png", "PNG")
    rows = [
        {"ds_name": "RLAIF-V", "image": "good.jpg", "question": "What is shown?", "chosen": "A gradient.",
         "rejected": "A cat.", "origin_dataset": "synthetic", "origin_split": "{}", "idx": "0"},
        {"image": "corrupt.jpg", "question": "Q?", "chosen": "Yes.", "rejected": "No."},
        {"image": {"path": "diagram.png", "bytes": None}, "prompt": "Describe it.", "chosen": "Stripes.",
         "rejected": "Dots."},
        {"image_path": "missing.jpg", "question": "Q?", "chosen": "Yes.", "rejected": "No."},
        {"question": "Text only?", "chosen": "Yes.", "rejected": "No."},
        {"image": "good.jpg", "question": "Same?", "chosen": "Same.", "rejected": "Same."},
        {"image": "good.jpg", "question": "Second?", "chosen": "B.", "rejected": "C."},
        {"image": "good.jpg", "question": "Third?", "chosen": "D.", "rejected": "E."},
    ]
    lines = [json.dumps(row) for row in rows]
    lines.insert(5, '{"question": "broken", "chosen": ')
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.jsonl", images, good


def run_preference(pairs, images, out, *extra):
    return preference.main(["--input", str(pairs), "--images", str(images), "--out", str(out), "--shard-size", "2",
                            *extra])


def test_preference_pairs_and_bad_records_skipped_with_reasons(tmp_path):
    pairs, images, good = preference_set(tmp_path)
    out = tmp_path / "out"
    manifest = run_preference(pairs, images, out)

    samples = read_back(out)
    assert [meta for meta, _ in samples] == [
        {"question": "What is shown?", "chosen": "A gradient.", "rejected": "A cat.", "image": "good.jpg",
         "ds_name": "RLAIF-V", "idx": "0", "origin_dataset": "synthetic", "origin_split": "{}"},
        {"question": "Describe it.", "chosen": "Stripes.", "rejected": "Dots.", "image": "diagram.png"},
        {"question": "Text only?", "chosen": "Yes.", "rejected": "No."},
        {"question": "Second?", "chosen": "B.", "rejected": "C.", "image": "good.jpg"},
        {"question": "Third?", "chosen": "D.", "rejected": "E.", "image": "good.jpg"},
    ]
    assert samples[0][1] == good and samples[2][1] is None
    reasons = {s["item"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"line 2", "line 4", "line 6", "line 7"}
    assert reasons["line 2"].startswith("corrupt image corrupt.jpg")
    assert reasons["line 4"] == "missing image: missing.jpg"
    assert reasons["line 6"].startswith("invalid JSON")
    assert reasons["line 7"] == "chosen and rejected answers are the same"
    assert manifest["samples"] == 5 and sum(s["samples"] for s in manifest["shards"]) == 5
    assert all(s["bytes"] == (out / s["name"]).stat().st_size for s in manifest["shards"])


def vqa_set(root):
    """A JSONL file in the field layouts of the common VQA exports, with bad entries; returns (file, images dir,
    the image bytes by name)."""
    images = root / "images"
    data = {"a.jpg": save(gradient((60, 40)), images / "a.jpg", "JPEG"),
            "b.png": save(gradient((30, 50)), images / "b.png", "PNG"),
            "docs/c.jpg": save(gradient((80, 20)), images / "docs" / "c.jpg", "JPEG"),
            "d.jpg": save(gradient((40, 40)), images / "d.jpg", "JPEG")}
    ten = [{"answer": "red", "answer_confidence": "yes", "answer_id": i} for i in range(7)] + \
          [{"answer": "dark red", "answer_confidence": "maybe", "answer_id": i} for i in range(7, 10)]
    rows = [
        {"question_id": 11, "image_id": 1, "image": "a.jpg", "question": "What colour is it?", "answers": ten,
         "multiple_choice_answer": "red", "question_type": "what color is", "answer_type": "other"},  # VQAv2
        {"question_id": 12, "image": "a.jpg", "question": "What does it say?",
         "answers": ["stop"] * 3 + ["STOP"] * 4 + ["go"] * 3},  # TextVQA: answers as strings
        {"imgname": "b.png", "query": "Which bar is highest?", "label": "B"},  # ChartQA
        {"questionId": 7, "question": "What is the date?", "answers": ["1999", "1999."], "image": "docs/c.jpg"},  # DocVQA
        {"id": "m1", "images": ["a.jpg", "b.png", "d.jpg"], "question": "Which picture is square?", "answer": "the third"},
        {"image": "a.jpg", "answers": ["x"]},  # no question
        {"image": "a.jpg", "question": "Q?", "answers": []},  # no answer
        {"question": "Where is the image?", "answer": "nowhere"},  # no image
        {"image": "missing.jpg", "question": "Q?", "answer": "A"},
        {"images": ["a.jpg", "missing.jpg"], "question": "Both?", "answer": "no"},
    ]
    (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "questions.jsonl", images, data


def test_vqa_exports_one_sample_per_image_set_with_every_question(tmp_path):
    questions, images, data = vqa_set(tmp_path)
    out = tmp_path / "out"
    manifest = vqa.main(["--input", str(questions), "--images", str(images), "--out", str(out), "--type", "textvqa",
                         "--shard-size", "2"])
    reader = ShardReader(out)
    records = [reader[i] for i in range(len(reader))]
    metas = [json.loads(r["json"]) for r in records]
    assert metas == [
        {"images": ["a.jpg"], "qa": [
            {"q": "What colour is it?", "a": "red", "answers": ["red"] * 7 + ["dark red"] * 3, "type": "other", "id": 11},
            {"q": "What does it say?", "a": "stop", "answers": ["stop"] * 3 + ["STOP"] * 4 + ["go"] * 3,
             "type": "textvqa", "id": 12}]},
        {"images": ["b.png"], "qa": [{"q": "Which bar is highest?", "a": "B", "answers": ["B"], "type": "textvqa"}]},
        {"images": ["docs/c.jpg"], "qa": [{"q": "What is the date?", "a": "1999", "answers": ["1999", "1999."],
                                           "type": "textvqa", "id": 7}]},
        {"images": ["a.jpg", "b.png", "d.jpg"], "qa": [{"q": "Which picture is square?", "a": "the third",
                                                        "answers": ["the third"], "type": "textvqa", "id": "m1"}]},
    ]
    assert records[0]["jpg"] == data["a.jpg"] and "1.jpg" not in records[0]  # JPEG files are stored as they are
    assert records[3]["jpg"] == data["a.jpg"] and records[3]["2.jpg"] == data["d.jpg"]
    assert np.abs(pixels(records[3]["1.jpg"]) - pixels(data["b.png"])).mean() < 3  # PNG re-encoded as JPEG
    reasons = {s["item"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {"line 6": "no question (fields question, query)",
                       "line 7": "field 'answers' holds no answer",
                       "line 8": "no image (fields images, image, image_path, imgname, file_name)",
                       "line 9": "missing image: missing.jpg", "line 10": "missing image: missing.jpg"}


def test_two_workers_write_what_one_writes(tmp_path):
    pairs, images, _ = preference_set(tmp_path)
    one, two = run_preference(pairs, images, tmp_path / "one"), run_preference(pairs, images, tmp_path / "two",
                                                                               "--workers", "2")
    assert one == two
    for shard in one["shards"]:
        assert (tmp_path / "one" / shard["name"]).read_bytes() == (tmp_path / "two" / shard["name"]).read_bytes()
    args = ["--samples", "24", "--image-size", "64", "--shard-size", "5"]
    one = synthetic.main(["--out", str(tmp_path / "syn1"), *args])
    assert synthetic.main(["--out", str(tmp_path / "syn2"), "--workers", "2", *args]) == one


def test_interrupted_run_resumes_to_the_same_manifest(tmp_path, monkeypatch):
    pairs, images, _ = preference_set(tmp_path)
    reference = run_preference(pairs, images, tmp_path / "reference")

    out = tmp_path / "out"
    load_jpeg = common.load_jpeg

    def interrupted(images_dir, relative):
        if relative == "good.jpg" and interrupted.calls == 2:  # the last shard's second record
            raise KeyboardInterrupt
        interrupted.calls += relative == "good.jpg"
        return load_jpeg(images_dir, relative)

    interrupted.calls = 0
    monkeypatch.setattr(common, "load_jpeg", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_preference(pairs, images, out)
    monkeypatch.setattr(common, "load_jpeg", load_jpeg)
    assert not (out / MANIFEST).exists()
    finished = {path.name: path.stat().st_ino for path in out.glob("*.tar")}
    assert sorted(finished) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert (out / "shard-000003.tar.tmp").exists()  # the shard it was writing

    assert run_preference(pairs, images, out) == reference
    assert manifest_of(out) == reference
    assert all(out.joinpath(name).stat().st_ino == inode for name, inode in finished.items())  # not rewritten
    for shard in reference["shards"]:
        assert (out / shard["name"]).read_bytes() == (tmp_path / "reference" / shard["name"]).read_bytes()


def test_rerun_with_other_settings_is_refused_and_leaves_the_set_intact(tmp_path):
    manifest = synthetic.main(["--out", str(tmp_path / "out"), "--samples", "4", "--image-size", "32"])
    with pytest.raises(SystemExit, match="other settings"):
        synthetic.main(["--out", str(tmp_path / "out"), "--samples", "5", "--image-size", "32"])
    assert manifest_of(tmp_path / "out") == manifest


def test_synthetic_cli_matches_write_shards_and_the_generator(tmp_path):
    manifest = synthetic.main(["--out", str(tmp_path / "cli"), "--samples", "7", "--seed", "5", "--image-size", "48",
                               "--shard-size", "3"])
    records = [scene_record(5, i, 48) for i in range(7)]
    assert write_shards(records, tmp_path / "direct", shard_size=3)["sha256"] == manifest["sha256"]
    reader = ShardReader(tmp_path / "cli")
    assert [reader[i] for i in range(len(reader))] == records
    heldout = synthetic.main(["--out", str(tmp_path / "heldout"), "--samples", "7", "--seed", "5", "--split",
                              "heldout", "--image-size", "48"])
    assert heldout["settings"]["seed"] == 6 and heldout["sha256"] != manifest["sha256"]


@pytest.mark.parametrize("tool, argv", [
    (coco, ["--captions", "{missing}", "--images", "{tmp}"]),
    (llava, ["--data", "{missing}"]),
    (text, ["--input", "{missing}"]),
    (preference, ["--input", "{missing}"]),
    (vqa, ["--input", "{missing}"]),
])
def test_missing_input_file_is_a_clear_error(tmp_path, capsys, tool, argv):
    argv = [a.format(missing=tmp_path / "nope.json", tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        tool.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"input file not found: {tmp_path / 'nope.json'}" in capsys.readouterr().err


def test_coco_file_that_is_not_json_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "captions.json").write_text('{"images": [')
    with pytest.raises(SystemExit):
        coco.main(["--captions", str(tmp_path / "captions.json"), "--images", str(tmp_path),
                   "--out", str(tmp_path / "o")])
    assert "not valid JSON" in capsys.readouterr().err


def test_image_paths_outside_the_images_directory_are_skipped(tmp_path):
    """A record naming ../secret.jpg or an absolute path never copies that file into the shards."""
    images = tmp_path / "images"
    save(gradient(), images / "good.jpg", "JPEG")
    save(gradient(), tmp_path / "secret.jpg", "JPEG")
    rows = [{"image": "good.jpg", "question": "Q?", "chosen": "A.", "rejected": "B."},
            {"image": "../secret.jpg", "question": "Q?", "chosen": "A.", "rejected": "B."},
            {"image": str(tmp_path / "secret.jpg"), "question": "Q?", "chosen": "A.", "rejected": "B."}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    manifest = run_preference(tmp_path / "pairs.jsonl", images, tmp_path / "out")
    assert manifest["samples"] == 1
    assert [s["item"] for s in manifest["skipped"]] == ["line 2", "line 3"]
    assert all("is outside the images directory" in s["reason"] for s in manifest["skipped"])


def test_shard_prefix_cannot_leave_the_output_directory(tmp_path):
    job = common.Job(tool="t", items=[("0", 0)], convert=lambda payload: {"json": b"{}"}, settings={})
    with pytest.raises(ValueError, match="would write outside the output directory"):
        common.build(job, tmp_path / "out", shard_size=1, prefix="../escaped")
    assert not (tmp_path / "escaped-000000.tar").exists()
