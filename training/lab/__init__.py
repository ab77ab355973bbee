"""The CPU miniature: a tiny character-level GPT, chained modular arithmetic with a planted wrong
belief, and GRPO with every strategy of the CARE core (see training/lab/README.md)."""
