"""Write one lm-evaluation-harness task YAML per MMLU subject into plora_mmlu/.

Usage (from the project root):  python docs/lm_eval_tasks/make_mmlu_tasks.py ../shared/data/mmlu

The data path is written into the YAMLs as given, so give it relative to the directory
lm_eval will be started from. Task names are ``plora_mmlu_<subject>``.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "plora_mmlu"


def main(mmlu_dir: str) -> None:
    subjects = sorted(p.name[: -len("_test.csv")] for p in Path(mmlu_dir, "test").glob("*_test.csv"))
    if not subjects:
        sys.exit(f"no <subject>_test.csv files in {mmlu_dir}/test")
    for s in subjects:
        words = " ".join(s.split("_"))
        (HERE / f"plora_mmlu_{s}.yaml").write_text(
            "include: _plora_mmlu_template_yaml\n"
            f"task: plora_mmlu_{s}\n"
            "dataset_path: csv\n"
            "dataset_kwargs:\n"
            "  column_names: [question, A, B, C, D, answer]\n"
            "  keep_default_na: false\n"
            "  na_filter: false\n"
            "  data_files:\n"
            f"    dev: {mmlu_dir}/dev/{s}_dev.csv\n"
            f"    test: {mmlu_dir}/test/{s}_test.csv\n"
            f'description: "The following are multiple choice questions (with answers) about {words}.\\n\\n"\n'
        )
    print(f"wrote {len(subjects)} task files to {HERE}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mmlu")
