"""Evaluation like the field's: bits per byte, multiple choice by log-likelihood, generative tasks graded
by exact match, and an lm-evaluation-harness model (lm_eval_adapter, optional).

  python -m gpt_jax eval --workdir=RUN --tasks=embedded,mc:arc_easy.jsonl,gen:gsm8k.jsonl:grader=number,bpb:wiki.txt

tasks.py: the --tasks syntax and the task files; loglik.py: batched, length-bucketed log-likelihood;
generate.py: answers and graders; run.py: the command, the Evaluator and the pipeline's table.
"""
