//! How a protocol frame ([`crate::protocol::AgentMessage`], [`crate::protocol::EdgeMessage`])
//! is read: its `type` first, then its fields straight into that kind's variant.
//!
//! serde reads an internally tagged enum (`#[serde(tag = "type")]`) by buffering the whole
//! frame — each of its strings, maps and lists copied once more — before it knows which
//! variant to read it into: 12 % of the edge's allocations, and most of the agent's reading
//! of its orders, a frame at a time (issue 11). Every frame a peer of ours writes has its
//! `type` first (serde writes the tag first), so [`read`] takes the variant from it and
//! reads the other fields as they come. A frame whose `type` is not first (anyone on the
//! path may write one), or that is a list (`["credit", {…}]`, which serde takes too), is
//! read as serde read it, its fields buffered: what reads, what is refused and in which
//! words is as it was — the fields' own errors (a missing, repeated or mistyped field)
//! come from the same derived code, now with where in the frame they are. One difference,
//! in what no kind reads: a field a kind does not have (at any depth), and everything in a
//! kind the enum does not know, is passed over as serde passes over any struct's unknown
//! field — its JSON checked, its values not decoded — where serde's buffering decoded
//! every value of the frame, and so refused a number past `f64`'s range, a lone
//! surrogate `\u` escape, or a value nested past serde_json's 128 levels in a field it
//! then ignored. Such a frame is now taken, as any other JSON body with an unknown field
//! is across Claude Runner: passing over a value walks it without recursing (serde_json's
//! `ignore_value` keeps its own stack, a byte a level), so depth costs no more than the
//! frame's length, which the frame limit bounds.
//!
//! The variants are read by serde's derive of each enum as an externally tagged one (a
//! `remote` derive, which the compiler checks field for field against the enum): [`read`]
//! hands it the frame as an enum whose variant is the `type` and whose content is the
//! frame's other fields.

use serde::de::value::{BorrowedStrDeserializer, MapDeserializer, StringDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, IntoDeserializer, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;
use std::marker::PhantomData;

/// The field that names a frame's kind.
const TYPE: &str = "type";

/// A message enum read by its `type` ([`read`]).
pub(crate) trait ByType<'de>: Sized {
    /// The enum's name, as serde's errors name it.
    const NAME: &'static str;

    /// Reads the variant from `frame`, an externally tagged enum's form of it: serde's
    /// `remote` derive of the enum's variants.
    fn variant<D: Deserializer<'de>>(frame: D) -> Result<Self, D::Error>;
}

/// Reads a frame of `T`.
pub(crate) fn read<'de, T: ByType<'de>, D: Deserializer<'de>>(frame: D) -> Result<T, D::Error> {
    frame.deserialize_any(Frame(PhantomData))
}

struct Frame<T>(PhantomData<T>);

impl<'de, T: ByType<'de>> Visitor<'de> for Frame<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "internally tagged enum {}", T::NAME)
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<T, M::Error> {
        match map.next_key::<Key<'de>>()? {
            None => Err(de::Error::missing_field(TYPE)),
            Some(key) if key.is_type() => T::variant(TypeFirst { map }),
            Some(first) => buffered(first, map),
        }
    }

    /// `[type, field, …]`: the fields in their order, as serde reads a list for a struct.
    fn visit_seq<S: SeqAccess<'de>>(self, seq: S) -> Result<T, S::Error> {
        T::variant(ListOf { seq })
    }
}

/// A field's name, borrowed from the frame where it can be (no allocation).
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn is_type(&self) -> bool {
        self.as_str() == TYPE
    }

    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }
}

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v))
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

/// The name handed to a variant's field visitor, as the frame's own deserializer hands it.
impl<'de, E: de::Error> IntoDeserializer<'de, E> for Key<'de> {
    type Deserializer = KeyDeserializer<'de, E>;

    fn into_deserializer(self) -> KeyDeserializer<'de, E> {
        match self {
            Key::Borrowed(s) => KeyDeserializer::Borrowed(BorrowedStrDeserializer::new(s)),
            Key::Owned(s) => KeyDeserializer::Owned(StringDeserializer::new(s)),
        }
    }
}

enum KeyDeserializer<'de, E> {
    Borrowed(BorrowedStrDeserializer<'de, E>),
    Owned(StringDeserializer<E>),
}

impl<'de, E: de::Error> Deserializer<'de> for KeyDeserializer<'de, E> {
    type Error = E;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, E> {
        match self {
            KeyDeserializer::Borrowed(d) => d.deserialize_any(visitor),
            KeyDeserializer::Owned(d) => d.deserialize_any(visitor),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// A frame whose first field is its `type`, read as an externally tagged enum: the
/// variant is the `type`'s value, read where it stands, and the content the fields after
/// it, read as they come ([`Rest`]).
struct TypeFirst<M> {
    map: M,
}

impl<'de, M: MapAccess<'de>> Deserializer<'de> for TypeFirst<M> {
    type Error = M::Error;

    fn deserialize_enum<V: Visitor<'de>>(self, _: &'static str, _: &'static [&'static str], visitor: V) -> Result<V::Value, M::Error> {
        visitor.visit_enum(self)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, M::Error> {
        Err(de::Error::custom("a frame is read as an enum"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

impl<'de, M: MapAccess<'de>> EnumAccess<'de> for TypeFirst<M> {
    type Error = M::Error;
    type Variant = Rest<M>;

    fn variant_seed<V: DeserializeSeed<'de>>(mut self, seed: V) -> Result<(V::Value, Rest<M>), M::Error> {
        let variant = self.map.next_value_seed(seed)?;
        Ok((variant, Rest { map: self.map }))
    }
}

/// The fields after a frame's `type`. A second `type` is refused, as serde refused it.
struct Rest<M> {
    map: M,
}

impl<'de, M: MapAccess<'de>> MapAccess<'de> for Rest<M> {
    type Error = M::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, M::Error> {
        match self.map.next_key::<Key<'de>>()? {
            None => Ok(None),
            Some(key) if key.is_type() => Err(de::Error::duplicate_field(TYPE)),
            Some(key) => seed.deserialize(key.into_deserializer()).map(Some),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, M::Error> {
        self.map.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

impl<'de, M: MapAccess<'de>> VariantAccess<'de> for Rest<M> {
    type Error = M::Error;

    /// A kind the enum does not know (its `#[serde(other)]` variant): whatever follows is
    /// passed over, as serde passed it over.
    fn unit_variant(mut self) -> Result<(), M::Error> {
        while self.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn struct_variant<V: Visitor<'de>>(self, _: &'static [&'static str], visitor: V) -> Result<V::Value, M::Error> {
        visitor.visit_map(self)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _: T) -> Result<T::Value, M::Error> {
        Err(de::Error::custom("a frame's kinds are structs"))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, M::Error> {
        Err(de::Error::custom("a frame's kinds are structs"))
    }
}

/// A frame as a list, `[type, field, …]`: the variant from its first element, the fields
/// from the others in their order.
struct ListOf<S> {
    seq: S,
}

impl<'de, S: SeqAccess<'de>> Deserializer<'de> for ListOf<S> {
    type Error = S::Error;

    fn deserialize_enum<V: Visitor<'de>>(self, _: &'static str, _: &'static [&'static str], visitor: V) -> Result<V::Value, S::Error> {
        visitor.visit_enum(self)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, S::Error> {
        Err(de::Error::custom("a frame is read as an enum"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

impl<'de, S: SeqAccess<'de>> EnumAccess<'de> for ListOf<S> {
    type Error = S::Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(mut self, seed: V) -> Result<(V::Value, Self), S::Error> {
        match self.seq.next_element_seed(seed)? {
            Some(variant) => Ok((variant, self)),
            None => Err(de::Error::missing_field(TYPE)),
        }
    }
}

impl<'de, S: SeqAccess<'de>> ListOf<S> {
    /// Refuses elements past the `taken` a kind reads, as serde refused them (it read a
    /// list's elements all first).
    fn end(mut self, taken: usize) -> Result<(), S::Error> {
        let mut left = 0;
        while self.seq.next_element::<IgnoredAny>()?.is_some() {
            left += 1;
        }
        if left == 0 {
            return Ok(());
        }
        let expected = if taken == 1 { "1 element in sequence".to_string() } else { format!("{taken} elements in sequence") };
        Err(de::Error::invalid_length(taken + left, &expected.as_str()))
    }
}

impl<'de, S: SeqAccess<'de>> VariantAccess<'de> for ListOf<S> {
    type Error = S::Error;

    fn unit_variant(self) -> Result<(), S::Error> {
        self.end(0)
    }

    fn struct_variant<V: Visitor<'de>>(mut self, _: &'static [&'static str], visitor: V) -> Result<V::Value, S::Error> {
        let mut counted = Counted { seq: &mut self.seq, taken: 0 };
        let value = visitor.visit_seq(&mut counted)?;
        let taken = counted.taken;
        self.end(taken)?;
        Ok(value)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _: T) -> Result<T::Value, S::Error> {
        Err(de::Error::custom("a frame's kinds are structs"))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, S::Error> {
        Err(de::Error::custom("a frame's kinds are structs"))
    }
}

/// Counts the elements a kind's fields take of a list.
struct Counted<'a, S> {
    seq: &'a mut S,
    taken: usize,
}

impl<'de, S: SeqAccess<'de>> SeqAccess<'de> for Counted<'_, S> {
    type Error = S::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, S::Error> {
        let element = self.seq.next_element_seed(seed)?;
        self.taken += usize::from(element.is_some());
        Ok(element)
    }
}

/// A frame whose `type` is not its first field (`first` is): its fields are kept as the
/// JSON text they are (each checked to be one value, duplicate keys and all) until its
/// `type` is found, as serde buffered every frame, then read from there. A frame is JSON
/// text read in place (`serde_json::from_str`, as `protocol::decode` reads it): such a
/// frame from any other deserializer is refused.
fn buffered<'de, T: ByType<'de>, M: MapAccess<'de>>(first: Key<'de>, mut map: M) -> Result<T, M::Error> {
    let mut fields = vec![(first, map.next_value::<&'de RawValue>()?)];
    let mut kind = None;
    while let Some(key) = map.next_key::<Key<'de>>()? {
        if key.is_type() {
            if kind.is_some() {
                return Err(de::Error::duplicate_field(TYPE));
            }
            kind = Some(map.next_value::<&'de RawValue>()?);
        } else {
            fields.push((key, map.next_value::<&'de RawValue>()?));
        }
    }
    let kind = kind.ok_or_else(|| de::Error::missing_field(TYPE))?;
    T::variant(Buffered { kind, fields: Fields(fields) }).map_err(|e| de::Error::custom(words(&e)))
}

/// A buffered field's error in its words, without where in that field's own text it is
/// (the frame's reader says where in the frame).
fn words(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.strip_suffix(&format!(" at line {} column {}", e.line(), e.column())) {
        Some(words) if e.line() > 0 => words.to_string(),
        _ => text,
    }
}

/// [`buffered`]'s frame, as an externally tagged enum.
struct Buffered<'de> {
    kind: &'de RawValue,
    fields: Fields<'de>,
}

/// [`Buffered`]'s fields but its `type`, in their order.
struct Fields<'de>(Vec<(Key<'de>, &'de RawValue)>);

impl<'de> Deserializer<'de> for Buffered<'de> {
    type Error = serde_json::Error;

    fn deserialize_enum<V: Visitor<'de>>(self, _: &'static str, _: &'static [&'static str], visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("a frame is read as an enum"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

impl<'de> EnumAccess<'de> for Buffered<'de> {
    type Error = serde_json::Error;
    type Variant = Fields<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self::Variant), Self::Error> {
        Ok((seed.deserialize(self.kind)?, self.fields))
    }
}

impl<'de> VariantAccess<'de> for Fields<'de> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        Ok(())
    }

    fn struct_variant<V: Visitor<'de>>(self, _: &'static [&'static str], visitor: V) -> Result<V::Value, Self::Error> {
        let mut fields = MapDeserializer::new(self.0.into_iter());
        let value = visitor.visit_map(&mut fields)?;
        fields.end()?;
        Ok(value)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, _: T) -> Result<T::Value, Self::Error> {
        Err(de::Error::custom("a frame's kinds are structs"))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("a frame's kinds are structs"))
    }
}
