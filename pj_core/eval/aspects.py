"""What each judge is told a dimension means.

The pairwise judge and the implicit-reward scorer read an *aspect*: a short noun phrase and a
one-sentence description written for judging (ours, not the generator's persona text, so a
judge does not simply reward copying the persona's wording). The embedding judge compares a
response with the catalog preference's own description.

Example:
    >>> from pj_core.personas import get_preference
    >>> aspect = aspect_for(get_preference("humor"))
    >>> aspect.noun
    'humour'
    >>> aspect.embedding_text
    'Light, playful humour that still answers the question.'
"""

from __future__ import annotations

from dataclasses import dataclass

from pj_core.personas import Preference

# Written for judging: what a reader would notice in an answer that has the quality.
_JUDGING_TEXTS: dict[str, tuple[str, str]] = {
    "helpful": ("helpfulness", "it solves the user's actual problem with concrete, usable steps"),
    "harmless": (
        "harmlessness",
        "nothing in it could hurt anyone; it declines or redirects dangerous requests and "
        "stays respectful",
    ),
    "humor": (
        "humour",
        "it is funny or playful (jokes, wit, a light tone) while still responding to the request",
    ),
    "correct": (
        "correctness",
        "its statements are factually accurate and it admits "
        "uncertainty instead of inventing facts",
    ),
    "informative": ("informativeness", "it is thorough, with background, details and examples"),
    "professional": (
        "professionalism",
        "its tone is measured, courteous and formal, as in a workplace report",
    ),
    "creative": ("creativity", "it offers original ideas and unexpected angles"),
    "touching": (
        "emotional warmth",
        "it is heartfelt and speaks to the feelings behind the question",
    ),
    "vivid": (
        "vividness",
        "it uses concrete, colourful, sensory language that lets the reader "
        "picture what it describes",
    ),
    "concise": ("concision", "it is short and to the point, without filler"),
    "elementary": ("simplicity", "a ten-year-old could follow it: everyday words, no jargon"),
    "expert": ("expertise", "it uses precise technical terms and goes to advanced points"),
    "friendly": ("friendliness", "its tone is warm, kind and encouraging"),
    "unfriendly": ("bluntness", "its tone is curt and unfriendly, without pleasantries"),
}


@dataclass(frozen=True)
class Aspect:
    """A dimension as the judges see it.

    Attributes:
        dimension: the catalog preference name (``"humor"``).
        noun: what is judged (``"humour"``).
        description: when an answer has it, one clause for the judging prompts.
        embedding_text: the catalog description, which the embedding judge compares with.
    """

    dimension: str
    noun: str
    description: str
    embedding_text: str

    @property
    def judging_text(self) -> str:
        """``"<noun>: <description>"``, the line the pairwise judge reads.

        Example:
            >>> from pj_core.personas import get_preference
            >>> aspect_for(get_preference("vivid")).judging_text.startswith("vividness: it uses")
            True
        """
        return f"{self.noun}: {self.description}"


def aspect_for(preference: Preference) -> Aspect:
    """The judging aspect of a catalog (or custom) preference.

    A preference without a text of ours falls back to its own name and description.

    Example:
        >>> from pj_core.personas import Preference
        >>> custom = Preference(name="pirate", description="Talks like a pirate.",
        ...                     phrasings=("Talk like a pirate.", "Speak as a sea rover."))
        >>> aspect_for(custom).judging_text
        'pirate: Talks like a pirate.'
    """
    noun, description = _JUDGING_TEXTS.get(
        preference.name, (preference.name, preference.description)
    )
    return Aspect(
        dimension=preference.name,
        noun=noun,
        description=description,
        embedding_text=preference.description,
    )
