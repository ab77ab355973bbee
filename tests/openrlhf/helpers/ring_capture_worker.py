"""One rank of the ring-attention capture test (run as R processes over gloo).

Every rank builds the same right-padded batch and hidden states [B, T, H]; OpenRLHF's own
``get_tensor_in_current_ring_attn_rank`` (the function that slices the packed tokens for ring
attention) decides which packed positions this rank holds, so this rank's lm_head input is the
packed hidden states at exactly those positions (zeros on the ring padding). The ring gather must
return, on every rank, what the padded gather returns on the whole batch.

    python ring_capture_worker.py RANK WORLD PORT OUT_JSON
"""
import json
import sys

import torch
import torch.distributed as dist


def main(rank, world, port, out):
    from openrlhf.models.ring_attn_utils import get_tensor_in_current_ring_attn_rank

    from care_ext.integrations.openrlhf.capture import gather_features

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res = {}
    try:
        g = torch.Generator().manual_seed(0)
        for case, (prompt_lens, resp_lens) in enumerate([([3, 5, 2], [4, 1, 6]), ([1, 7, 2, 4], [2, 3, 1, 5]),
                                                         ([6], [0])]):
            B, T, H = len(prompt_lens), max(p + r for p, r in zip(prompt_lens, resp_lens)), 8
            att = torch.zeros(B, T, dtype=torch.long)
            act = torch.zeros(B, T - 1, dtype=torch.bool)
            for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
                att[b, : p + r] = 1
                act[b, p - 1: p + r - 1] = True
            for dtype in (torch.float32, torch.bfloat16):
                hidden = torch.randn(B, T, H, generator=g).to(dtype)
                ref_p, ref_r = gather_features(hidden, act, att, packed=False)
                packed = hidden[att.bool()]  # [nnz, H], row-major as unpad_input lays it out
                pos = torch.arange(packed.shape[0])[None]
                local_pos, pad = get_tensor_in_current_ring_attn_rank(pos, dist.group.WORLD, -1)
                local = torch.where(local_pos[0, :, None] >= 0, packed[local_pos[0].clamp(min=0)],
                                    torch.zeros((), dtype=dtype))[None]
                hp, hr = gather_features(local, act, att, packed=True, ring_group=dist.group.WORLD)
                res[f"{case}/{dtype}"] = {"equal": bool(torch.equal(hp, ref_p) and torch.equal(hr, ref_r)),
                                          "local_len": int(local.shape[1]), "pad": int(pad),
                                          "dtype": str(hp.dtype)}
        try:  # a slice of the wrong length is refused on every rank
            gather_features(torch.zeros(1, 1000, 8), act, att, packed=True, ring_group=dist.group.WORLD)
            res["bad_slice"] = "accepted"
        except ValueError as exc:
            res["bad_slice"] = str(exc)
    finally:
        dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
