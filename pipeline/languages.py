"""Languages by ISO 639-1 code: what ``OMNIQ_LANGUAGE`` accepts, how the model's answer is read, and the name
the transcript prompt uses."""

from __future__ import annotations

import re

NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "as": "Assamese", "az": "Azerbaijani", "ba": "Bashkir",
    "be": "Belarusian", "bg": "Bulgarian", "bn": "Bengali", "bo": "Tibetan", "br": "Breton", "bs": "Bosnian",
    "ca": "Catalan", "cs": "Czech", "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "eo": "Esperanto", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian", "fi": "Finnish",
    "fo": "Faroese", "fr": "French", "ga": "Irish", "gl": "Galician", "gu": "Gujarati", "ha": "Hausa",
    "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian", "hy": "Armenian",
    "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "jv": "Javanese", "ka": "Georgian",
    "kk": "Kazakh", "km": "Khmer", "kn": "Kannada", "ko": "Korean", "la": "Latin", "lb": "Luxembourgish",
    "ln": "Lingala", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mg": "Malagasy", "mi": "Maori",
    "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian", "mr": "Marathi", "ms": "Malay", "mt": "Maltese",
    "my": "Burmese", "ne": "Nepali", "nl": "Dutch", "nn": "Norwegian Nynorsk", "no": "Norwegian", "oc": "Occitan",
    "pa": "Punjabi", "pl": "Polish", "ps": "Pashto", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian",
    "sa": "Sanskrit", "sd": "Sindhi", "si": "Sinhala", "sk": "Slovak", "sl": "Slovenian", "sn": "Shona",
    "so": "Somali", "sq": "Albanian", "sr": "Serbian", "su": "Sundanese", "sv": "Swedish", "sw": "Swahili",
    "ta": "Tamil", "te": "Telugu", "tg": "Tajik", "th": "Thai", "tk": "Turkmen", "tl": "Tagalog", "tr": "Turkish",
    "tt": "Tatar", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese", "yi": "Yiddish",
    "yo": "Yoruba", "yue": "Cantonese", "zh": "Chinese",
}  # fmt: skip
_BY_NAME = {name.lower(): code for code, name in NAMES.items()} | {
    "mandarin": "zh", "farsi": "fa", "filipino": "tl", "castilian": "es", "moldovan": "ro", "flemish": "nl",
}  # fmt: skip


def code_of(value: str) -> str | None:
    """The ISO 639-1 code for a code or an English language name (``"en"``, ``"EN"``, ``"English"``)."""
    text = value.strip().lower().replace("_", "-")
    base = text.split("-")[0]  # en-US -> en
    if base in NAMES:
        return base
    return _BY_NAME.get(text)


def name_of(code: str) -> str:
    return NAMES.get(code, code)


def parse_answer(answer: str) -> str | None:
    """The language in a model's answer to "which language is spoken? answer with its ISO 639-1 code": the code
    alone (``en``, ``"en".``, ``en-US``), else a language name in a sentence (``The language is German.``);
    None when it names none. Two-letter words inside a sentence are not read as codes ("it is", "as"...)."""
    words = re.findall(r"[A-Za-z]+(?:-[A-Za-z]+)?", answer)
    if not words:
        return None
    if len(words) <= 2 and (code := code_of(words[0])) is not None:
        return code
    for word in words:
        if len(word) > 3 and (code := code_of(word)) is not None:
            return code
    return None
