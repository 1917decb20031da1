// LiveIdTable: map semantics for dense ids (the vector) and any other id (the hash map) alike.
#include "simulator/live_id_table.h"

#include <gtest/gtest.h>

#include <cstdint>

namespace llmem::sim {
namespace {

TEST(LiveIdTableTest, DenseAndSparseIdsBehaveAsAMap) {
  LiveIdTable<int> t;
  const int64_t ids[] = {0, 1, 7, 1000, -1, -123456789, int64_t{1} << 40, (int64_t{1} << 24) - 1, int64_t{1} << 24};
  for (int64_t id : ids) EXPECT_FALSE(t.Contains(id)) << id;
  int v = 0;
  for (int64_t id : ids) t.Insert(id, v++);
  v = 0;
  for (int64_t id : ids) {
    ASSERT_NE(t.Find(id), nullptr) << id;
    EXPECT_EQ(*t.Find(id), v++) << id;
  }
  EXPECT_FALSE(t.Contains(2));  // between dense ids that are live
  EXPECT_FALSE(t.Contains(-2));
  for (int64_t id : ids) {
    t.Erase(id);
    EXPECT_FALSE(t.Contains(id)) << id;
  }
  // An erased id can be live again, with a new value.
  t.Insert(7, 42);
  t.Insert(-1, 43);
  EXPECT_EQ(*t.Find(7), 42);
  EXPECT_EQ(*t.Find(-1), 43);
}

TEST(LiveIdTableTest, ZeroIsAValueNotAbsence) {
  LiveIdTable<int> t;
  t.Insert(3, 0);
  ASSERT_TRUE(t.Contains(3));
  EXPECT_EQ(*t.Find(3), 0);
}

}  // namespace
}  // namespace llmem::sim
