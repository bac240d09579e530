//! Reading the wanted fields out of a MaxMind DB record.
//!
//! Records are decoded by visiting only the wanted keys, borrowing strings
//! from the database buffer. Every value is accepted whatever its type: what
//! is not wanted is skipped whole (so the decoder stays in step) and a wanted
//! field of an unexpected type reads as absent, instead of failing the record
//! the way a derived `Deserialize` would.

use std::{fmt, marker::PhantomData};

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::GeoRef;

/// An ISO 3166-1 alpha-2 code: exactly two upper-case ASCII letters.
pub(super) fn iso_code(code: Option<&str>) -> Option<&str> {
    code.filter(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase()))
}

/// The wanted fields of one record, each `None` when absent or mistyped.
#[derive(Debug, Default)]
pub(super) struct Fields<'a> {
    pub(super) country: Option<&'a str>,
    pub(super) registered_country: Option<&'a str>,
    pub(super) asn: Option<u32>,
    pub(super) as_org: Option<&'a str>,
    pub(super) traits_asn: Option<u32>,
    pub(super) traits_as_org: Option<&'a str>,
}

impl<'a> Fields<'a> {
    /// Fills what `geo` lacks from this record.
    pub(super) fn merge_into(self, geo: &mut GeoRef<'a>) {
        if geo.country.is_none() {
            geo.country = iso_code(self.country).or(iso_code(self.registered_country));
        }
        if geo.asn.is_none() {
            let (asn, as_org) = if self.asn.is_some() {
                (self.asn, self.as_org)
            } else if self.traits_asn.is_some() {
                (self.traits_asn, self.traits_as_org)
            } else {
                (None, self.as_org.or(self.traits_as_org))
            };
            if asn.is_some() {
                geo.asn = asn;
                geo.as_org = as_org;
            } else if geo.as_org.is_none() {
                geo.as_org = as_org;
            }
        }
    }
}

/// A map some of whose keys are wanted; [`Lenient`] reads it.
pub(super) trait WantedKeys<'de>: Default {
    /// What the map is, for decoder messages.
    const EXPECTING: &'static str;

    /// Reads the value of `key` from `map` into `self` if `key` is wanted;
    /// `false` leaves the value for the caller to skip.
    fn take<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error>;
}

/// A `T` read leniently: any value that is not a map is an empty `T`.
#[derive(Debug, Default)]
pub(super) struct Lenient<T>(pub(super) T);

impl<'de, T: WantedKeys<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LenientVisitor(PhantomData))
    }
}

struct LenientVisitor<T>(PhantomData<T>);

impl<'de, T: WantedKeys<'de>> Visitor<'de> for LenientVisitor<T> {
    type Value = Lenient<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut value = T::default();
        while let Some(key) = map.next_key::<Scalar<'de>>()? {
            let taken = match key {
                Scalar::Str(key) => value.take(key, &mut map)?,
                _ => false,
            };
            if !taken {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Lenient(value))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Lenient::default())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Lenient::default())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Lenient::default())
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Self::Value, E> {
        Ok(Lenient::default())
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Self::Value, E> {
        Ok(Lenient::default())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Lenient::default())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Lenient::default())
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
        Ok(Lenient::default())
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Lenient::default())
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Lenient::default())
    }
    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        IgnoredAny::deserialize(deserializer)?;
        Ok(Lenient::default())
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        IgnoredAny::deserialize(deserializer)?;
        Ok(Lenient::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Lenient::default())
    }
}

/// `country`, `registered_country`: a map whose `iso_code` is wanted.
#[derive(Debug, Default)]
struct Place<'a> {
    iso_code: Option<&'a str>,
}

impl<'de> WantedKeys<'de> for Place<'de> {
    const EXPECTING: &'static str = "a country map";

    fn take<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        if key != "iso_code" {
            return Ok(false);
        }
        self.iso_code = map.next_value::<Scalar<'de>>()?.str();
        Ok(true)
    }
}

/// `traits` (GeoIP2-Enterprise): a map whose AS fields are wanted.
#[derive(Debug, Default)]
struct Traits<'a> {
    asn: Option<u32>,
    as_org: Option<&'a str>,
}

impl<'de> WantedKeys<'de> for Traits<'de> {
    const EXPECTING: &'static str = "a traits map";

    fn take<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "autonomous_system_number" => self.asn = map.next_value::<Scalar<'de>>()?.u32(),
            "autonomous_system_organization" => {
                self.as_org = map.next_value::<Scalar<'de>>()?.str();
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl<'de> WantedKeys<'de> for Fields<'de> {
    const EXPECTING: &'static str = "a GeoIP record map";

    fn take<A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "country" => self.country = map.next_value::<Lenient<Place<'de>>>()?.0.iso_code,
            "registered_country" => {
                self.registered_country = map.next_value::<Lenient<Place<'de>>>()?.0.iso_code;
            }
            "autonomous_system_number" => self.asn = map.next_value::<Scalar<'de>>()?.u32(),
            "autonomous_system_organization" => {
                self.as_org = map.next_value::<Scalar<'de>>()?.str();
            }
            "traits" => {
                let traits = map.next_value::<Lenient<Traits<'de>>>()?.0;
                self.traits_asn = traits.asn;
                self.traits_as_org = traits.as_org;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// A scalar of any type; maps and arrays are skipped.
#[derive(Debug, Default, Clone, Copy)]
enum Scalar<'a> {
    Str(&'a str),
    Unsigned(u128),
    #[default]
    Other,
}

impl<'a> Scalar<'a> {
    fn str(self) -> Option<&'a str> {
        match self {
            Scalar::Str(s) if !s.is_empty() => Some(s),
            _ => None,
        }
    }

    fn u32(self) -> Option<u32> {
        match self {
            Scalar::Unsigned(n) => u32::try_from(n).ok(),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(s))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Unsigned(n.into()))
    }

    fn visit_u128<E: de::Error>(self, n: u128) -> Result<Self::Value, E> {
        Ok(Scalar::Unsigned(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
        Ok(u128::try_from(n).map_or(Scalar::Other, Scalar::Unsigned))
    }

    fn visit_i128<E: de::Error>(self, n: i128) -> Result<Self::Value, E> {
        Ok(u128::try_from(n).map_or(Scalar::Other, Scalar::Unsigned))
    }

    // A string that cannot be borrowed from the database (never the case
    // with maxminddb) is treated as absent rather than allocated.
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        IgnoredAny::deserialize(deserializer)?;
        Ok(Scalar::Other)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        IgnoredAny::deserialize(deserializer)?;
        Ok(Scalar::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}
