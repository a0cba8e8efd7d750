"""The Persona-judge algorithm: how next-token distributions become emitted tokens.

- :mod:`~pj_core.decoding.sampling`: the pure functions of Algorithm 1 (filtered
  probabilities, acceptance test, residual);
- :mod:`~pj_core.decoding.rounds`: the round structure both strategies share (roles, the
  fixed layout of uniforms, judging a drafted token, the bonus token);
- :mod:`~pj_core.decoding.logits`: the logit pipeline every position goes through
  (transforms, then temperature, top-k, top-p) and the transform interface;
- :mod:`~pj_core.decoding.guidance`: the persona-strength transform;
- :mod:`~pj_core.decoding.speculative`, :mod:`~pj_core.decoding.lockstep`,
  :mod:`~pj_core.decoding.pool`: the strategies (emission generators);
- :mod:`~pj_core.decoding.strategy_choice`: what ``strategy="auto"`` runs;
- :mod:`~pj_core.decoding.stopping`: incremental detokenisation and stop strings;
- :mod:`~pj_core.decoding.generation_config`: one call's validated settings.

It reaches a model only through the backend protocol (:mod:`pj_core.backends.protocol`;
it imports no transformers and no backend, ``tests/test_architecture.py`` checks) and knows
nothing of personas, prompts or requests: the request layer (:mod:`pj_core.engine`,
:mod:`pj_core.batch`) sits above it.
"""
