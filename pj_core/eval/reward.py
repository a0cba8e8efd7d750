"""The implicit-reward scorer: how much an instruction that asks for the aspect raises the
likelihood of a response.

``reward(y) = log p(y | ask_for_aspect + question) - log p(y | neutral + question)`` under a
scorer model, by default Gemma 3 270M *base* (another family than the SmolLM2 generator, so
the scorer does not share the generator's quirks). Both terms sum the log-probabilities of the
same response token ids (the response is tokenised once, apart from its context), so the
difference only reflects the instruction. The plain text format suits a base model:

    <instruction>

    Question: <question>

    Answer:
    <response>

Sequences are scored in left-padded batches; only the response positions go through the
vocabulary projection (Gemma's vocabulary has 262k entries).

Example:
    >>> from pj_core.eval.judges import HUMOUR
    >>> aspect_instruction(HUMOUR)
    'Write an answer to the question that shows humour: it is funny or playful.'
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pj_core.errors import EvaluationError
from pj_core.eval.aspects import Aspect
from pj_core.eval.judges import ScoreItem

NEUTRAL_INSTRUCTION = "Write an answer to the question."
DEFAULT_BATCH_SIZE = 4


def aspect_instruction(aspect: Aspect) -> str:
    """The instruction that asks for the aspect."""
    return f"Write an answer to the question that shows {aspect.noun}: {aspect.description}."


def plain_context(instruction: str, prompt: str) -> str:
    """The plain-text context of the scorer, ending where the answer starts."""
    return f"{instruction}\n\nQuestion: {prompt.strip()}\n\nAnswer:\n"


def response_logprobs(
    model: PreTrainedModel,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[float]:
    """Sum of ``log p(response | context)`` for each ``(context_ids, response_ids)`` pair.

    An empty response scores 0. The context must not be empty (the first response token needs
    something to be predicted from).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=16,
        ...     intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...     num_key_value_heads=1)).eval()
        >>> scores = response_logprobs(model, [([2, 3], [5, 6]), ([4], [])])
        >>> scores[0] < 0.0, scores[1]
        (True, 0.0)
    """
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    scores: list[float] = [0.0] * len(pairs)
    todo = [i for i, (_, response) in enumerate(pairs) if response]
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        sequences = []
        for i in rows:
            context, response = pairs[i]
            if not context:
                raise EvaluationError("a scoring context is empty: give the instruction text")
            sequences.append([*context, *response])
        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        longest = max(len(pairs[i][1]) for i in rows)
        # Responses end every row (left padding), so the last `longest + 1` positions hold
        # every logit that predicts a response token.
        keep = longest + 1
        kwargs: dict[str, object] = {
            "attention_mask": mask.to(device),
            "position_ids": positions.to(device),
        }
        if takes_keep:
            kwargs["logits_to_keep"] = keep
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), **kwargs).logits[:, -keep:, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, i in enumerate(rows):
            response = pairs[i][1]
            n = len(response)
            # The logit at kept index keep-n-1+j predicts response token j.
            predictors = logprobs[row, keep - n - 1 : keep - 1, :]
            targets = torch.tensor(list(response), device=predictors.device).unsqueeze(-1)
            scores[i] = float(predictors.gather(-1, targets).sum())
    return scores


class ImplicitRewardJudge:
    """Pointwise judge: the implicit reward of each response for its aspect.

    Example (needs the packaged Gemma 3 270M):
        >>> from pj_core.backends.hf.models import load_model  # doctest: +SKIP
        >>> gemma = load_model("gemma3-270m")  # doctest: +SKIP
        >>> judge = ImplicitRewardJudge(gemma.model, gemma.tokenizer)  # doctest: +SKIP
        >>> from pj_core.eval.judges import HUMOUR
        >>> judge.score([ScoreItem("Tell a joke.", "Why did...", HUMOUR)])  # doctest: +SKIP
        [3.2]
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        name: str = "reward",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name
        # The neutral term depends on the response only, not on the aspect: each response is
        # scored on several dimensions, so remember it instead of recomputing it.
        self._neutral: dict[tuple[str, str], float] = {}

    def _context(self, instruction: str, prompt: str) -> list[int]:
        # The context keeps the tokenizer's special tokens (Gemma's <bos>).
        return list(self.tokenizer.encode(plain_context(instruction, prompt)))

    def score(self, items: Sequence[ScoreItem]) -> list[float]:
        """``log p(y | aspect instruction) - log p(y | neutral instruction)`` per item."""
        pairs: list[tuple[list[int], list[int]]] = []
        aspect_rows: list[int] = []
        neutral_rows: dict[tuple[str, str], int] = {}
        for item in items:
            response = list(self.tokenizer.encode(item.response.strip(), add_special_tokens=False))
            aspect_rows.append(len(pairs))
            pairs.append((self._context(aspect_instruction(item.aspect), item.prompt), response))
            key = (item.prompt, item.response)
            if key not in self._neutral and key not in neutral_rows:
                neutral_rows[key] = len(pairs)
                pairs.append((self._context(NEUTRAL_INSTRUCTION, item.prompt), response))
        logprobs = response_logprobs(self.model, pairs, batch_size=self.batch_size)
        for key, row in neutral_rows.items():
            self._neutral[key] = logprobs[row]
        return [
            logprobs[row] - self._neutral[(item.prompt, item.response)]
            for row, item in zip(aspect_rows, items, strict=True)
        ]
