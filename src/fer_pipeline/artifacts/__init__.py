"""Typed artifacts: one pydantic model per file or answer that a user or another part relies
on; that model writes it and reads it back, and its JSON Schema is published in docs/schemas/
(`fer schemas` writes them; a test keeps them current).

One module per producer, so that a DVC stage depends only on the models of what it writes or
reads (editing the predict answers reruns no stage):
  base.py        reading and writing, shared by all
  train.py       reports/train/<name>/metrics.json: train writes; evaluate and export read
  evaluation.py  the declared metric list; reports/evaluate/{metrics,champion}.json
  release.py     release/model.json: export writes; predict, serve and the card read
  answers.py     what `fer predict` prints (json, jsonl) and `fer serve` answers
  schemas.py     the published schemas, generated from these models
Base modules: nothing here imports a stage.
"""
