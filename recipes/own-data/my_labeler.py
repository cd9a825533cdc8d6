"""An example labeler for `align rank` (`labeler: recipes/own-data/my_labeler.py:score`): replace it with yours.

A labeler gets one prompt and its K sampled responses and returns K numbers, higher = better; equal numbers are ties.
This one prefers answers of about 20 words that do not repeat themselves: a stand-in for a real judgment (a rubric,
a test suite, a judge model, ...).
"""


def score(prompt: str, responses: list[str]) -> list[float]:
    out = []
    for response in responses:
        words = response.split()
        repeats = len(words) - len(set(words))
        out.append(-abs(len(words) - 20) - 2 * repeats)
    return out
