"""Every stage reads its data through this package.

- `load_examples(manifest.data, split, seed)`: one split through the source's adapter
  (tldr, hh-rlhf, apps, jsonl, demo), bad rows counted per reason.
- `stage_examples(manifest, stage, split)`: the stage's disjoint part of it (data_split).
- `load_stage_data(manifest, stage, split, tokenizer)`: tokenized, cached, with a collator.
- `oracle_score(post_or_prompt, summary)`: the demo task's gold reward (see wprctl.data.demo).
- `demo_tokenizer_corpus(seed)`: text for training the tiny model's tokenizer.

Torch and `datasets` are imported only when tokenizing, so importing this package is cheap.
"""

from wprctl.data.base import ADAPTERS, Adapter, Example, ExampleSet, SkipRow, get_adapter
from wprctl.data.demo import demo_tokenizer_corpus, generate_rows, oracle_breakdown, oracle_score
from wprctl.data.loading import load_examples
from wprctl.data.prompts import INSTRUCTION_SUFFIXES, post_from_prompt
from wprctl.data.splits import STAGES, stage_examples, stage_partition
from wprctl.data.tokenize import StageData, load_stage_data, make_collate, tokenize_examples

__all__ = [
    "ADAPTERS",
    "INSTRUCTION_SUFFIXES",
    "STAGES",
    "Adapter",
    "Example",
    "ExampleSet",
    "SkipRow",
    "StageData",
    "demo_tokenizer_corpus",
    "generate_rows",
    "get_adapter",
    "load_examples",
    "load_stage_data",
    "make_collate",
    "oracle_breakdown",
    "oracle_score",
    "post_from_prompt",
    "stage_examples",
    "stage_partition",
    "tokenize_examples",
]
