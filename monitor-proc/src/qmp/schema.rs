//! QEMU-exact validation of command arguments against static schema tables,
//! run before serde decodes the arguments into typed structs.
//!
//! Behaviour of QEMU's QObject input visitor (`qapi/qobject-input-visitor.c`,
//! `qapi/qapi-visit-core.c`), checked against QEMU 10.0.2:
//!
//! * Members are visited in schema order; the first missing or mistyped one
//!   wins. Unknown members of a struct are reported after all its declared
//!   members were visited (before the parent's next member). Of several
//!   unknown members we name the first in input order (QEMU: hash order).
//! * Missing, type and unknown-member errors use the full name:
//!   `addr.data.path`, `enable[0]`.
//! * Range and enum errors ("Parameter 'x' expects uint32_t", "Parameter 'x'
//!   does not accept value 'y'") use the bare member name, and `null` for a
//!   list element: QEMU says "Parameter 'null' does not accept value 'foo'"
//!   for `{"enable": ["foo"]}`.
//! * A present member is checked even if optional, so an explicit `null`
//!   fails unless the type is [`ArgType::Any`].
//! * Integer slots take integers only (`1.0` is "expected: integer"). The
//!   unsigned ones are read as uint64 first: a non-integer (string, float)
//!   is "Parameter 'x' expects uint64" (full name), and a negative integer
//!   is accepted and wraps to 2^64 + n, "for backward compatibility" says
//!   QEMU; uint8/16/32 then reject it by range. [`normalize`] applies that
//!   wrap so serde can decode such values into `u64`.

use serde_json::{Map, Value};

use super::QmpError;

/// A QAPI argument type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgType {
    Str,
    Bool,
    /// QAPI `int` / `int64`.
    Int,
    Int8,
    Int16,
    Int32,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    /// QAPI `size`: a `uint64` on the QMP wire.
    Size,
    /// QAPI `number`: any JSON number.
    Number,
    /// QAPI `any`: any JSON value, `null` included.
    Any,
    Enum(&'static [&'static str]),
    Struct(&'static [Member]),
    List(&'static ArgType),
}

/// A struct member (or command argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub name: &'static str,
    pub ty: ArgType,
    pub optional: bool,
}

impl Member {
    pub const fn required(name: &'static str, ty: ArgType) -> Self {
        Self {
            name,
            ty,
            optional: false,
        }
    }

    pub const fn optional(name: &'static str, ty: ArgType) -> Self {
        Self {
            name,
            ty,
            optional: true,
        }
    }
}

/// Checks `args` against `members` as QEMU's generated marshaller would.
pub fn validate(args: &Map<String, Value>, members: &[Member]) -> Result<(), QmpError> {
    check_struct(args, members, "")
}

/// Rewrites negative integers in `UInt64`/`Size` slots to the `u64` QEMU
/// reads them as. Call after [`validate`] succeeded.
pub fn normalize(args: &mut Map<String, Value>, members: &[Member]) {
    for m in members {
        if let Some(v) = args.get_mut(m.name) {
            normalize_value(v, &m.ty);
        }
    }
}

fn normalize_value(v: &mut Value, ty: &ArgType) {
    match (ty, v) {
        (ArgType::UInt64 | ArgType::Size, v) => {
            if let Some(n) = v.as_i64().filter(|n| *n < 0) {
                *v = Value::from(n as u64);
            }
        }
        (ArgType::Struct(members), Value::Object(map)) => normalize(map, members),
        (ArgType::List(elem), Value::Array(items)) => {
            for item in items {
                normalize_value(item, elem);
            }
        }
        _ => {}
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

fn check_struct(
    obj: &Map<String, Value>,
    members: &[Member],
    prefix: &str,
) -> Result<(), QmpError> {
    for m in members {
        match obj.get(m.name) {
            Some(v) => check_value(v, &m.ty, &join(prefix, m.name), m.name)?,
            None if m.optional => {}
            None => {
                return Err(QmpError::generic(format!(
                    "Parameter '{}' is missing",
                    join(prefix, m.name)
                )));
            }
        }
    }
    match obj
        .keys()
        .find(|k| members.iter().all(|m| m.name != k.as_str()))
    {
        Some(k) => Err(QmpError::generic(format!(
            "Parameter '{}' is unexpected",
            join(prefix, k)
        ))),
        None => Ok(()),
    }
}

/// `full` names the value in missing/type errors; `bare` in range and enum
/// errors (the member name, or "null" for a list element).
fn check_value(v: &Value, ty: &ArgType, full: &str, bare: &str) -> Result<(), QmpError> {
    let wrong_type = |expected: &str| {
        QmpError::generic(format!(
            "Invalid parameter type for '{full}', expected: {expected}"
        ))
    };
    let expects =
        |name: &str, what: &str| QmpError::generic(format!("Parameter '{name}' expects {what}"));
    let int = || v.as_i64().ok_or_else(|| wrong_type("integer"));
    // Negative integers wrap, as QEMU accepts them "for backward compatibility".
    let uint = || {
        v.as_u64()
            .or_else(|| v.as_i64().map(|n| n as u64))
            .ok_or_else(|| expects(full, "uint64"))
    };
    let ranged = |ok: bool, what: &str| if ok { Ok(()) } else { Err(expects(bare, what)) };
    match ty {
        ArgType::Any => Ok(()),
        ArgType::Str => v
            .is_string()
            .then_some(())
            .ok_or_else(|| wrong_type("string")),
        ArgType::Bool => v
            .is_boolean()
            .then_some(())
            .ok_or_else(|| wrong_type("boolean")),
        ArgType::Number => v
            .is_number()
            .then_some(())
            .ok_or_else(|| wrong_type("number")),
        ArgType::Int => int().map(drop),
        ArgType::Int8 => ranged(i8::try_from(int()?).is_ok(), "int8_t"),
        ArgType::Int16 => ranged(i16::try_from(int()?).is_ok(), "int16_t"),
        ArgType::Int32 => ranged(i32::try_from(int()?).is_ok(), "int32_t"),
        ArgType::UInt8 => ranged(u8::try_from(uint()?).is_ok(), "uint8_t"),
        ArgType::UInt16 => ranged(u16::try_from(uint()?).is_ok(), "uint16_t"),
        ArgType::UInt32 => ranged(u32::try_from(uint()?).is_ok(), "uint32_t"),
        ArgType::UInt64 | ArgType::Size => uint().map(drop),
        ArgType::Enum(values) => {
            let s = v.as_str().ok_or_else(|| wrong_type("string"))?;
            if values.contains(&s) {
                Ok(())
            } else {
                Err(QmpError::generic(format!(
                    "Parameter '{bare}' does not accept value '{s}'"
                )))
            }
        }
        ArgType::Struct(members) => {
            let obj = v.as_object().ok_or_else(|| wrong_type("object"))?;
            check_struct(obj, members, full)
        }
        ArgType::List(elem) => {
            let items = v.as_array().ok_or_else(|| wrong_type("array"))?;
            items
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| check_value(item, elem, &format!("{full}[{i}]"), "null"))
        }
    }
}
