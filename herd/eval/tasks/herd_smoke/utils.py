"""Loads one of this folder's JSONL files as the `test` split for lm-eval (the tasks' custom_dataset): local files
only, nothing fetched."""
import json
from pathlib import Path


def load(file: str, **metadata):
    import datasets

    path = Path(__file__).parent / file
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
