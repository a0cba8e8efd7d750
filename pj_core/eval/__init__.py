"""The quality evaluation harness: does Persona-judge beat direct prompting on *your* model?

Modules, in data-flow order:

- :mod:`~pj_core.eval.data`: evaluation prompts (JSONL/JSON, or the shipped Koala sample);
- :mod:`~pj_core.eval.methods`: direct prompting, Persona-judge, Persona-judge-Base and
  single-preference prompts for a preference set;
- :mod:`~pj_core.eval.aspects`: what each judge is told a dimension means;
- :mod:`~pj_core.eval.judges` (pairwise LLM judge, both orders),
  :mod:`~pj_core.eval.reward` (implicit reward under a scorer model),
  :mod:`~pj_core.eval.embedding` (MiniLM cosine similarity);
- :mod:`~pj_core.eval.records`: the resumable results JSONL;
- :mod:`~pj_core.eval.runner`: runs what the file lacks, prompt by prompt, with a progress bar;
  :mod:`~pj_core.eval.backends` builds the real models for it;
- :mod:`~pj_core.eval.stats`: win rates (win 1, tie 0.5, loss 0) with bootstrap CIs;
- :mod:`~pj_core.eval.report`: summary JSON, markdown table and PNG chart.

The command line is ``pj eval`` (:mod:`pj_core.cli.eval`); ``docs/evaluation.md`` shows a run.

Example:
    >>> from pj_core.eval import EvalConfig, win_rate_ci
    >>> EvalConfig().dimensions
    ('humor', 'harmless', 'vivid')
    >>> win_rate_ci([1.0, 1.0]).as_tuple()
    (1.0, 1.0, 1.0)
"""

from pj_core.eval.config import EvalConfig
from pj_core.eval.data import EvalPrompt, load_prompts
from pj_core.eval.records import ResultsLog
from pj_core.eval.stats import WinRate, win_rate_ci

__all__ = ["EvalConfig", "EvalPrompt", "ResultsLog", "WinRate", "load_prompts", "win_rate_ci"]
