"""Every adapter method on 17 architectures: attach, train a step, save, reload in a fresh process, merge.

The harness is `peftprompt.method_matrix` (also run by ``benchmarks/architectures.py``). A cell must end ``ok``
or be refused by design, for the reason below; no cell may fail.
"""

from __future__ import annotations

import pytest

from peftprompt.method_matrix import ARCHITECTURES, Reloader, check_architecture
from peftprompt.methods import MERGEABLE_METHODS, METHODS, REFUSED_METHODS

ENCODERS = {"bert", "roberta", "distilbert", "deberta-v2", "electra", "modernbert"}
# GPT-2's linear layers are transformers Conv1D layers, which these PEFT tuners do not adapt (OLoRA's
# initialisation does not transpose them)
CONV1D_UNSUPPORTED = {"osf", "olora", "loha", "lokr", "boft", "oft", "hra", "miss", "road", "shira", "c3a", "psoft",
                      "lily", "delora", "glora", "adamss", "peanut", "supertuning"}
# (architectures, methods, a fragment of the one-line reason)
REFUSED_BY_DESIGN = [
    (set(ARCHITECTURES), set(REFUSED_METHODS), "is refused: "),
    (set(ARCHITECTURES) - {"llama", "mistral", "gpt2"}, {"adaption_prompt"},
     "adaption prompts are defined for gpt2, llama, mistral attention only"),
    # BEFT trains the value projection's bias; these fuse it with the query and key projections
    ({"phi3", "gpt2", "gpt_neox", "falcon", "modernbert"}, {"beft"}, "beft: no default target modules"),
    ({"gpt2"}, CONV1D_UNSUPPORTED, "Conv1D"),
    ({"falcon"}, {"glora"}, "FalconLinear(in_features=32, out_features=48, bias=False) is not a plain"),
    (ENCODERS - {"modernbert"}, {"shadow"}, "Unable to automatically find a `nn.ModuleList` of decoder layers"),
    ({"distilbert", "deberta-v2", "modernbert"}, {"prefix", "cartridge"}, "takes no past_key_values"),
    (ENCODERS, {"trainable_tokens"}, "trains token embeddings only, so the new seq_cls head would stay untrained"),
]


def expected_refusal(architecture: str, method: str):
    for architectures, methods, reason in REFUSED_BY_DESIGN:
        if architecture in architectures and method in methods:
            return reason
    return None


@pytest.fixture(scope="session")
def reloader():
    """One fresh process that reloads the saved adapters of every architecture this worker checks (session-wide:
    xdist may hand a worker these cases between others)."""
    with Reloader() as process:
        yield process


@pytest.mark.slow
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_every_method_attaches_trains_reloads_and_merges(architecture, tmp_path, reloader):
    cells = check_architecture(architecture, [*METHODS, *REFUSED_METHODS], tmp_path, reloader)
    failed = [f"{cell.method}: {cell.reason}" for cell in cells if cell.status == "failed"]
    assert not failed, "\n".join(failed)
    for cell in cells:
        reason = expected_refusal(architecture, cell.method)
        if reason is not None:
            assert cell.status == "refused", f"{cell.method} was expected to be refused ({reason})"
            assert reason in cell.reason and "\n" not in cell.reason, cell.reason
            continue
        assert cell.status == "ok", f"{cell.method}: {cell.reason}"
        assert cell.trainable_params > 0 and cell.changed and cell.reloaded
        # merged where the method merges (logits within ATOL_MERGED), never tried where it does not
        assert cell.merged is (True if cell.method in MERGEABLE_METHODS else None), cell.method
