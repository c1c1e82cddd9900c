"""
The toy task: controlled sentiment with an exact reward (like the DPO paper's IMDb task). Prompts
ask for a review of an item; a response's reward is its share of positive minus negative words.
prepare.py writes its pairs; sample.py and online.py score samples with toy_reward.
"""
import random
import re


def _words(text):  # each of these words, after a space, is one GPT-2 token
    return [" " + w for w in text.split()]

TOY_ITEMS = _words(
    "movie book phone car hotel restaurant game song album laptop camera shoe chair table coffee "
    "pizza burger show film park beach museum bike watch bag jacket shirt lamp bed room bar cafe "
    "sandwich salad soup cake bread wine beer tea guitar piano concert class course teacher doctor "
    "app website service store shop product tool knife pen desk house apartment city")
TOY_VAL_ITEMS = TOY_ITEMS[5::6]  # 10 items whose prompts only ever appear in val
TOY_TEMPLATES = ("Review of the{item}:", "My review of the{item}:", "Thoughts on the{item}:")
TOY_POSITIVE = _words("good great nice excellent amazing wonderful perfect fantastic lovely best happy fun")
TOY_NEGATIVE = _words("bad terrible awful poor horrible worst boring ugly sad broken annoying useless")
TOY_NEUTRAL = _words("the was and very it is a this really quite so but my I think for of with just")
_POS, _NEG = {w.strip() for w in TOY_POSITIVE}, {w.strip() for w in TOY_NEGATIVE}
TOY_SPLIT = {t.format(item=i): "val" if i in TOY_VAL_ITEMS else "train"  # prompt -> its split
              for t in TOY_TEMPLATES for i in TOY_ITEMS}

def toy_reward(text):
    """(#positive - #negative words) / #words in [-1, 1], of the text before any <|endoftext|>"""
    words = re.findall(r"[a-z']+", text.split("<|endoftext|>")[0].lower())
    return (sum(w in _POS for w in words) - sum(w in _NEG for w in words)) / max(len(words), 1)

def _toy_response(rng, item):
    mood = rng.random()  # P(positive word) = 0.45 * mood, P(negative word) = 0.45 * (1 - mood)
    n = rng.randint(6, 10)
    words = [item] if rng.random() < 0.5 else []  # often starts with the item
    while len(words) < n:
        u = rng.random()
        if u < 0.45 * mood:
            words.append(rng.choice(TOY_POSITIVE))
        elif u < 0.45:
            words.append(rng.choice(TOY_NEGATIVE))
        else:
            words.append(rng.choice(TOY_NEUTRAL + [item]))
    return "".join(words) + " ."

def make_toy_pairs(n, seed):
    """n toy pairs {prompt, chosen, rejected}: two responses, chosen has the higher toy_reward"""
    rng, pairs = random.Random(seed), []
    for _ in range(n):
        item = rng.choice(TOY_ITEMS)
        prompt = rng.choice(TOY_TEMPLATES).format(item=item)
        a, b = _toy_response(rng, item), _toy_response(rng, item)
        while toy_reward(a) == toy_reward(b):  # ties carry no preference: resample
            b = _toy_response(rng, item)
        chosen, rejected = sorted((a, b), key=toy_reward, reverse=True)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs

def toy_prompts(split, seed=0):
    """All toy prompts of a split ("train" or "val"), in a seed-shuffled order (for evaluation)."""
    prompts = sorted(p for p, s in TOY_SPLIT.items() if s == split)
    return random.Random(seed).sample(prompts, len(prompts))
