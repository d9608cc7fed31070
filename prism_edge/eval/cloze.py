"""CBT-style cloze: read a passage, pick the word that fills the blank in the next sentence.

The Children's Book Test (Hill et al. 2016) gives 20 sentences of context, a 21st sentence with
one word replaced by XXXXX, and 10 candidate words of the answer's kind that occur in the context.
`build_items` makes items of the same shape from any real prose (here: news and Wikipedia text,
since CBT itself is not reachable offline); `score_items` answers them — real CBT rows from
`datasets.load_cbt` included — by the language model's log-probability of the question sentence
with each candidate filled in, given the context.
"""

from __future__ import annotations

import random
import re

import torch
from torch import nn

from ..config import PrismConfig
from ..runtime.simulator import simulate

BLANK = "XXXXX"
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WORD = re.compile(r"\b[A-Za-z][a-z]{3,}\b")
STOP = set("""this that with from have were been their there which would could should about after before
these those them they than then when what where will your into over also some such only other more most very
just like said says being does many much even while because through during among against between""".split())


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(text) if len(s.strip()) > 1]


def build_items(documents: list[str], count: int, context_sentences: int = 20, options: int = 10,
                seed: int = 0, max_context_chars: int = 1500, per_document: int = 3) -> list[dict]:
    """CBT-shaped items {context, question, options, answer} from real prose, deterministically.

    The answer is a content word of the question sentence that also occurs in the context (as in
    CBT); the other candidates are distinct content words of the context with the same
    capitalisation (names compete with names, common words with common words).  At most
    `per_document` items come from one document, so a small count still spans many documents.
    """
    rng = random.Random(seed)
    items: list[dict] = []
    for doc in documents:
        sents, taken = sentences(doc), 0
        for end in range(context_sentences, len(sents), context_sentences + 1):
            context = sents[end - context_sentences : end]
            while len(" ".join(context)) > max_context_chars and len(context) > 3:
                context = context[1:]
            question = sents[end]
            ctx_words = {w for s in context for w in _WORD.findall(s) if w.lower() not in STOP}
            answers = [w for w in _WORD.findall(question) if w in ctx_words]
            if not answers:
                continue
            answer = rng.choice(answers)
            same_kind = sorted(w for w in ctx_words if w != answer and w[0].isupper() == answer[0].isupper()
                               and w.lower() != answer.lower())
            if len(same_kind) < options - 1:
                continue
            cands = rng.sample(same_kind, options - 1) + [answer]
            rng.shuffle(cands)
            blanked = re.sub(rf"\b{re.escape(answer)}\b", BLANK, question, count=1)
            items.append({"context": context, "question": blanked, "options": cands, "answer": answer})
            taken += 1
            if len(items) >= count:
                return items
            if taken >= per_document:
                break
    if len(items) < count:
        raise ValueError(f"the text yields only {len(items)} cloze items, {count} asked; lower --limit")
    return items


@torch.no_grad()
def score_item(model: nn.Module, tokenizer, item: dict, cfg: PrismConfig | None,
               max_length: int = 1024) -> tuple[int, int]:
    """(index of the chosen option, bytes exchanged): the option whose filled-in question scores highest."""
    context = " ".join(item["context"])
    ctx_ids = tokenizer(context)["input_ids"]
    rows, starts = [], []
    for option in item["options"]:
        q_ids = tokenizer(" " + item["question"].replace(BLANK, option))["input_ids"]
        if getattr(tokenizer, "bos_token_id", None) is not None and q_ids[:1] == [tokenizer.bos_token_id]:
            q_ids = q_ids[1:]
        ids = (ctx_ids + q_ids)[-max_length:]
        rows.append(ids)
        starts.append(len(ids) - len(q_ids))
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    if cfg is None:
        logits, nbytes = model(input_ids=input_ids, attention_mask=mask).logits, 0
    else:
        out = simulate(model, cfg, input_ids=input_ids, attention_mask=mask, count_flops=False)
        assert out.stats is not None  # the simulator always reports its run
        logits, nbytes = out.logits, out.stats.total_bytes
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    scores = [float(logp[b, starts[b] - 1 : len(rows[b]) - 1].sum()) for b in range(len(rows))]
    return max(range(len(scores)), key=scores.__getitem__), nbytes
