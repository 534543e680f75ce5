"""Normalization: Unicode form, invisible characters, HTML remnants, whitespace, and PII placeholders.

NFC, not NFKC: NFKC folds full-width CJK punctuation ("，" → ","), which would change Chinese text.
"""

from __future__ import annotations

import html
import re
import unicodedata

# Zero-width space/joiners that carry no meaning in prose; ZWJ (U+200D) is kept because emoji sequences need it.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad\u200e\u200f\u202a\u202b\u202c\u202d\u202e"))
# C0/C1 controls except tab and newline.
CONTROL = dict.fromkeys(c for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09, 0x0A))
SPACES = {
    ord(c): " "
    for c in "\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f"
}

# Only known HTML tags, so "a < b" or "<placeholder>" in a prompt survive.
HTML_BREAK = re.compile(r"<\s*(?:br|/p|/div|/li|/h[1-6]|/tr)\s*/?\s*>", re.I)
HTML_TAG = re.compile(
    r"</?\s*(?:p|br|div|span|b|i|u|em|strong|a|li|ul|ol|h[1-6]|table|tbody|thead|tr|td|th|font|img|hr|sup|sub|"
    r"center|small|big|code|pre|blockquote|section|article|nav|header|footer)\b[^<>]*>",
    re.I,
)
HTML_ENTITY = re.compile(r"&(?:[a-zA-Z]{2,8}|#\d{2,6}|#x[0-9a-fA-F]{2,5});")

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}(?![\w-])")
URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"'）」]+[^\s<>\"'.,;:!?)）」]")
# Shapes, not "any 7 digits": years ("1990-2000"), prices and ids must survive.
PHONE = re.compile(
    r"(?<![0-9A-Za-z+])(?:"
    r"\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){2,4}"  # international +49 30 1234 5678
    r"|\(\d{3}\)\s?\d{3}[\s.-]\d{4}"  # (555) 123-4567
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 555-123-4567
    r"|1[3-9]\d{9}"  # Chinese mobile 13812345678
    r")(?![0-9A-Za-z])"
)
PII_KINDS = {"email": (EMAIL, "[EMAIL]"), "url": (URL, "[URL]"), "phone": (PHONE, "[PHONE]")}

HSPACE_RUN = re.compile(r"(?<=\S)[ \t]{2,}")
TRAILING = re.compile(r"[ \t]+$", re.M)
BLANK_RUN = re.compile(r"\n{3,}")


def normalize_text(text: str, form: str = "NFC", strip_html: bool = True, pii: tuple[str, ...] = ()) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize(form, text) if form else text
    text = text.translate(INVISIBLE).translate(CONTROL).translate(SPACES)
    if strip_html:
        text = HTML_BREAK.sub("\n", text)
        text = HTML_TAG.sub("", text)
        if HTML_ENTITY.search(text):
            text = html.unescape(text).translate(SPACES)
    for kind in pii:  # e-mail before URL, so "a@b.com" does not become a URL's tail
        pattern, placeholder = PII_KINDS[kind]
        text = pattern.sub(placeholder, text)
    text = HSPACE_RUN.sub(" ", text)  # leading indentation kept (code), inner runs collapsed
    text = TRAILING.sub("", text)
    text = BLANK_RUN.sub("\n\n", text)
    return text.strip()
