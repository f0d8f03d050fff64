"""`python -m lib.ops`: which form of each operation runs on this machine (lib/ops/dispatch.py)."""
import torch

from lib.ops import dispatch, native


def main():
    lib = native.library()
    print(f"C kernels: {'built and loaded' if lib is not None else 'not available'}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for dtype in (torch.float32, torch.float64):
            xyz = torch.zeros(1, 4, 3, dtype=dtype, device=device)
            pt = "C kernels" if dispatch.native_for(xyz) is not None else "plain compositions"
            print(f"{device} {str(dtype)[6:]}: FPS {dispatch.fps_form(xyz)}, kNN "
                  f"{dispatch.knn_form(xyz, xyz)}, PT layer ops: {pt}")
        # under bf16 autocast the points stay float32 (the lines above) and the features are bf16
        rows = torch.zeros(1, 4, 8, dtype=torch.bfloat16, device=device)
        pt = ("C kernels" if dispatch.native_for(rows, bf16_rows=True) is not None
              else "plain compositions")
        print(f"{device} bfloat16 rows (autocast): PT layer ops: {pt}")


if __name__ == "__main__":
    main()
