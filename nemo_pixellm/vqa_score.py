"""The VQA accuracy of an answer against the reference answers, as the official VQA evaluation computes it.

With several annotators (VQAv2 and TextVQA have ten) an answer scores min(1, annotators who gave it / 3),
averaged over the leave-one-annotator-out subsets; with fewer than 3 reference answers (ChartQA, DocVQA,
the synthetic set) it scores exact match with any of them. Answers are compared after the official
normalisation.
"""

import re

NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """The official VQA evaluation's normalisation: lower case, punctuation dropped (a point inside a number
    and a comma between digits kept as the number), number words as digits, articles dropped."""
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s]", "", text)
    words = [NUMBER_WORDS.get(word, word) for word in text.split() if word not in ARTICLES]
    return " ".join(words)


def vqa_score(said: str, answers: list[str]) -> float:
    """Exact match for fewer than 3 reference answers (any of them), else the VQA accuracy."""
    said = normalize_answer(said)
    answers = [normalize_answer(a) for a in answers]
    if len(answers) < 3:
        return float(said in answers)
    matches = sum(a == said for a in answers)
    # leave each annotator out in turn: min(1, matches among the others / 3)
    return sum(min(1.0, (matches - (a == said)) / 3) for a in answers) / len(answers)
