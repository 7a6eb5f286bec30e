"""Worker: numbers that must agree if two environments load the same pipeline — token ids, the text
encoder's output, a UNet call and a VAE decode on fixed inputs. Runs in either venv.

argv: pipeline_dir
"""
import sys

from _measure import one_thread

torch = one_thread()
import json  # noqa: E402

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

path = sys.argv[1]
tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    h = te(ids)[0]
    x = torch.randn(1, 4, 8, 8, generator=g)
    eps = unet(x, torch.tensor(500), encoder_hidden_states=h).sample
    img = vae.decode(x).sample
print(json.dumps({"ids": ids[0, :8].tolist(), "text": h.double().abs().sum().item(),
                  "unet": eps.double().abs().sum().item(), "vae": img.double().abs().sum().item()}))
