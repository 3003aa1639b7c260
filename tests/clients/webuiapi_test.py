"""`latent serve` driven by a client nobody here wrote: the `webuiapi` package from PyPI
(an AUTOMATIC1111 API client). Run by tests/clients/run_webuiapi.sh, which starts the server
with the tiny test models (tiny-sd1 first, the others from tests/fixtures) and HTTP Basic
authentication, and passes HOST PORT USER PASSWORD.
"""
import sys
import threading
import time

import webuiapi
from PIL import Image


def main(host, port, user, password):
    api = webuiapi.WebUIApi(host=host, port=port, username=user, password=password)

    models = api.util_get_model_names()
    assert models == ["tiny-lcm", "tiny-sd1", "tiny-sd1-inpaint", "tiny-sd2", "tiny-sdxl"], models
    assert api.util_get_current_model() == "tiny-sd1"
    samplers = api.util_get_sampler_names()
    for name in ["DDIM", "DPM++ 2M", "Euler", "Euler a", "LCM", "PLMS"]:
        assert name in samplers, samplers

    # txt2img with the client's defaults (Euler a, 20 steps, many fields latent ignores).
    r = api.txt2img(prompt="a red circle on a blue background", negative_prompt="green",
                    seed=11, width=64, height=64, batch_size=2, n_iter=2, cfg_scale=6)
    assert len(r.images) == 4, len(r.images)
    assert all(im.size == (64, 64) for im in r.images)
    assert r.info["all_seeds"] == [11, 12, 13, 14], r.info["all_seeds"]
    assert r.info["sampler_name"] == "Euler a"
    assert r.info["infotexts"][2].startswith(
        "a red circle on a blue background\nNegative prompt: green\nSteps: 20, Sampler: Euler a,"
    ), r.info["infotexts"][2]
    assert "Seed: 13," in r.info["infotexts"][2]
    assert r.images[0].info["parameters"] == r.info["infotexts"][0]

    # The same seed again, alone, gives the same picture (made in a batch of 2 before, which
    # changes float summation order only: a pixel may flip by one level).
    again = api.txt2img(prompt="a red circle on a blue background", negative_prompt="green",
                        seed=11, width=64, height=64, cfg_scale=6)
    worst = max(abs(a - b) for a, b in zip(again.image.tobytes(), r.images[0].tobytes()))
    assert worst <= 1, worst

    # DPM++ 2M with Karras.
    k = api.txt2img(prompt="a cat", seed=1, steps=4, width=64, height=64,
                    sampler_name="DPM++ 2M", scheduler="Karras")
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in k.info["infotexts"][0]

    # Model switch through options, as util_set_model does it.
    api.util_set_model("tiny-sd2")
    assert api.util_get_current_model() == "tiny-sd2"
    r2 = api.txt2img(prompt="a cat", seed=1, steps=3, width=64, height=64)
    assert r2.info["sd_model_name"] == "tiny-sd2", r2.info["sd_model_name"]
    assert "Model: tiny-sd2" in r2.info["infotexts"][0]
    api.util_set_model("tiny-sd1")
    assert api.util_get_current_model() == "tiny-sd1"

    # Interrupt a long job from another thread; it answers with what it made.
    outcome = {}

    def long_job():
        outcome["r"] = api.txt2img(prompt="a cat", steps=1000, n_iter=20, width=64, height=64,
                                   sampler_name="Euler")

    worker = threading.Thread(target=long_job)
    worker.start()
    deadline = time.time() + 60
    while api.get_progress()["state"]["sampling_step"] == 0:
        assert time.time() < deadline, "the job never started"
        time.sleep(0.05)
    progress = api.get_progress()
    assert progress["state"]["job_count"] == 20, progress["state"]
    assert 0 < progress["progress"] < 1, progress["progress"]
    api.interrupt()
    worker.join(60)
    assert not worker.is_alive(), "the interrupted request did not answer"
    assert outcome["r"].info["interrupted"] is True
    api.util_wait_for_ready(check_interval=0.1)

    # img2img from the picture made above, then inpainting with a mask (the client's defaults:
    # Euler a, mask_blur 4, inpainting_fill 0: "fill", recorded as AUTOMATIC1111 records it).
    i2i = api.img2img(images=[again.image], prompt="a cat", steps=4, seed=5, width=64, height=64,
                      denoising_strength=0.6)
    assert len(i2i.images) == 1 and i2i.image.size == (64, 64)
    assert i2i.info["denoising_strength"] == 0.6, i2i.info
    assert "Denoising strength: 0.6" in i2i.info["infotexts"][0], i2i.info["infotexts"][0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inp = api.img2img(images=[again.image], mask_image=mask, prompt="a cat", steps=4, seed=5,
                      width=64, height=64, denoising_strength=0.9)
    assert inp.image.size == (64, 64)
    assert "inpainting_fill" not in inp.info["ignored_fields"], inp.info["ignored_fields"]
    assert "Masked content: fill" in inp.info["infotexts"][0], inp.info["infotexts"][0]
    nothing = api.img2img(images=[again.image], mask_image=mask, prompt="a cat", steps=4, seed=5,
                          width=64, height=64, denoising_strength=0.9, inpainting_fill=3)
    assert "Masked content: latent nothing" in nothing.info["infotexts"][0], nothing.info
    assert nothing.image.tobytes() != inp.image.tobytes(), "another start, another picture"
    # A mask of another size is refused, naming the field, and the server goes on.
    try:
        api.img2img(images=[again.image], mask_image=Image.new("L", (8, 8), 255), prompt="a cat",
                    steps=2, width=64, height=64)
        raise AssertionError("a mask of another size was accepted")
    except RuntimeError as e:
        assert e.args[0] == 422, e.args

    # Wrong credentials are refused.
    stranger = webuiapi.WebUIApi(host=host, port=port, username=user, password=password + "x")
    try:
        stranger.txt2img(prompt="a cat", steps=2, width=64, height=64)
        raise AssertionError("wrong credentials were accepted")
    except RuntimeError as e:
        assert e.args[0] == 401, e.args

    print("webuiapi against latent serve: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
