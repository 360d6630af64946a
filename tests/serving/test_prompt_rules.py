"""The gRPC text path encodes prompts by the checkpoint's own tokenizer rules (issue 17): a
tokenizer that adds no BOS (SmolLM2's, whose bos_token <|im_start|> was glued to every prompt)
gets none, and the server's (and the Triton preprocessing model's) prompt ids are transformers'
`AutoTokenizer(...)(text)`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from real_tokenizer_configs import build_engine_with_tokenizer, write_smollm2_instruct
from server_utils import grpc_client, running_server, text_inputs

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine import Engine
from llamaforge.runtime.core.engine_core import EngineCore
from llamaforge.runtime.core.generate import generate_ids
from llamaforge.triton_repo.models.text import preprocess


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_engine_with_tokenizer(tmp_path_factory.mktemp("smol"), write_smollm2_instruct)


def test_grpc_text_path_sends_no_bos_the_tokenizer_does_not_add(smol: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    ckpt, engine_dir = smol
    ref = AutoTokenizer.from_pretrained(str(ckpt))
    core = EngineCore(engine_dir, CoreConfig(KVCacheConfig(budget_tokens=512), SchedulerConfig(max_num_seqs=2), max_queue=4))
    engine = Engine(engine_dir)
    with running_server(core) as server:
        client = grpc_client(server)
        for prompt in ("def main():", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"):
            ids = ref(prompt)["input_ids"]
            r = client.infer("ensemble", text_inputs(prompt, 4, exclude_input_in_output=True))
            assert r.as_numpy("num_input_tokens").reshape(-1).tolist() == [len(ids)]
            want = engine.tokenizer.decode(generate_ids(engine, [ids], 4, stop_at_eos=True)[0].output_ids)  # type: ignore[union-attr]
            assert r.as_numpy("text_output")[0].decode() == want
            # The Triton preprocessing model encodes the same way (triton_repo/models/text.py).
            pre = preprocess(engine.tokenizer, {"text_input": np.array([[prompt.encode()]], dtype=np.object_)})
            assert pre["input_ids"].tolist() == [ids]
