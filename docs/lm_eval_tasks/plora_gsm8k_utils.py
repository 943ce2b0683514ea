"""lm-evaluation-harness filter that applies plora's GSM8K answer rule to lm_eval's generations.

Written independently of plora (lm_eval imports it from this folder via ``--include_path``):
the number after the first ``####``, else the last number in the completion; ``$`` and
thousands commas dropped, a trailing ``.`` ignored; integral values printed without decimals
so that lm_eval's ``exact_match`` against the ``#### <n>`` target compares numbers.
"""

import re

_NUM = r"-?\$?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)"


def _canonical(text):
    text = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return "[invalid]"
    return str(int(value)) if value == int(value) else repr(value)


def _extract(completion):
    marked = re.search(r"####\s*(" + _NUM + ")", completion)
    if marked:
        return _canonical(marked.group(1))
    numbers = re.findall(_NUM, completion)
    return _canonical(numbers[-1]) if numbers else "[invalid]"


def plora_extract(resps, docs):
    """lm_eval ``custom`` filter: one list of completions per document -> extracted numbers."""
    return [[_extract(r) for r in doc_resps] for doc_resps in resps]
