"""The official VQA accuracy (the VQA API's vqaEval.py, the version LAVIS also uses).

A prediction is normalised (punctuation, then number words / articles / contractions); the ten
ground-truth answers only get the punctuation step, and only when they disagree. Accuracy of one
question = mean over the leave-one-annotator-out subsets of min(1, #subset answers matching / 3).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

# Missing apostrophes restored. Keys with capitals ("Im", "Ive", ...) never match after the
# lower-casing below; they are kept because the official table has them.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
# As written officially: "(?!<=\d)" is a (vacuous) lookahead, not a lookbehind, so every period
# not followed by a digit goes ("1.5" keeps its point, "yes." loses it).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        # Decided on the input text: a mark touching a space, or any digit-comma-digit anywhere,
        # is deleted; otherwise it becomes a space ("black/white" -> "black white").
        if p + " " in text or " " + p in text or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE (= 32) where `count` goes: at most 32 periods are removed.
    return PERIOD_STRIP.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official normalisation of a predicted answer: "Two." -> "2", "a dog" -> "dog"."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def question_accuracy(prediction: str, gt_answers: Sequence[str], normalize_gt: bool = False) -> float:
    """Accuracy in [0, 1] of one prediction against its annotators' answers (10 in VQA v2).

    Officially the ground truth is already normalised when the dataset is built, so the scorer
    only strips its punctuation, and only when the answers are not all identical;
    `normalize_gt=True` applies the full prediction normalisation instead (raw answers).
    """
    if not gt_answers:
        raise ValueError("question_accuracy: no ground-truth answers")
    pred = normalize_answer(prediction)
    if normalize_gt:
        gts = [normalize_answer(a) for a in gt_answers]
    elif len(set(gt_answers)) > 1:
        gts = [process_punctuation(a) for a in gt_answers]
    else:
        gts = list(gt_answers)
    matches = [a == pred for a in gts]
    total = sum(matches)
    # Leave annotator j out: the others agree total - matches[j] times.
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


def vqa_accuracy(predictions: Sequence[str], gt_answers: Sequence[Sequence[str]],
                 normalize_gt: bool = False) -> float:
    """Mean official VQA accuracy over questions, in percent (the server rounds it to 2 digits)."""
    if len(predictions) != len(gt_answers):
        raise ValueError(f"vqa_accuracy: {len(predictions)} predictions for {len(gt_answers)} questions")
    if not predictions:
        raise ValueError("vqa_accuracy: no predictions")
    accs = [question_accuracy(p, g, normalize_gt) for p, g in zip(predictions, gt_answers)]
    return 100.0 * sum(accs) / len(accs)
