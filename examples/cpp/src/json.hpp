// A minimal JSON reader (RFC 8259) for manifest.json and the graphs' metadata_props values.
// Read-only, no dependencies; numbers are doubles, objects keep their key order.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace json {

class Value {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_bool() const { return type_ == Type::Bool; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_string() const { return type_ == Type::String; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_object() const { return type_ == Type::Object; }

  bool boolean() const { return boolean_; }
  double number() const { return number_; }
  const std::string& string() const { return string_; }
  const std::vector<Value>& items() const { return items_; }  // array elements or object values
  const std::vector<std::string>& keys() const { return keys_; }  // object keys, in file order

  // The member named `key` of an object, or nullptr (also when this is not an object).
  const Value* find(const std::string& key) const;

 private:
  friend class Parser;
  friend bool operator==(const Value& a, const Value& b);
  Type type_ = Type::Null;
  bool boolean_ = false;
  double number_ = 0.0;
  std::string string_;
  std::vector<std::string> keys_;
  std::vector<Value> items_;
};

// Deep equality; objects compare as unordered key sets (as Python's dict ==).
bool operator==(const Value& a, const Value& b);
inline bool operator!=(const Value& a, const Value& b) { return !(a == b); }

// Parse a whole document; throws std::runtime_error naming the byte offset of the first error.
Value parse(const std::string& text);

}  // namespace json
