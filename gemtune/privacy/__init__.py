"""Privacy probes: how much of its training data an adapter reproduces, compared with its base.

- extraction.py: k-extractable training text under greedy decoding (Carlini et al. 2023);
- canary.py: exposure of planted secrets (Carlini et al. 2019);
- regurgitation.py: PII in sampled generations, and PII values that come from the data;
- probe.py: the three on the adapter and the base, thresholds, report, gemtune.json summary.
"""
