//! Making the query's output canonical: required columns cast, `series_id` kept or
//! computed, `into_labels` columns merged into `labels`.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayAccessor, ArrayRef, AsArray, MapArray, MapBuilder, RecordBatch, StringArray,
    StringBuilder, TypedDictionaryArray, UInt64Array,
};
use arrow::compute::{CastOptions, can_cast_types, cast_with_options};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef};
use arrow::util::display::FormatOptions;

use super::{STAGE, describe};
use crate::error::{Error, Result};
use crate::schema::{self, col};

/// Makes the query's output canonical: the four required columns cast to their types,
/// `series_id` kept or computed, `into_labels` columns merged into `labels`.
#[derive(Debug)]
pub(super) struct Conform {
    pub(super) schema: SchemaRef,
    ts: usize,
    metric: usize,
    labels: usize,
    value: usize,
    series_id: Option<usize>,
    /// Output columns (index, label name) merged into `labels`.
    into_labels: Vec<(usize, String)>,
    /// Other output columns, in query order.
    extra: Vec<usize>,
}

impl Conform {
    pub(super) fn new(output: &Schema, into_labels: &[String]) -> Result<Self, String> {
        let canonical = schema::metrics_schema();
        let find = |name: &str| -> Result<usize, String> {
            let i = output.index_of(name).map_err(|_| {
                format!(
                    "the query's result has no `{name}` column; it needs ts, metric, labels and value (it has {})",
                    describe(output)
                )
            })?;
            let from = output.field(i).data_type();
            let to = canonical
                .field_with_name(name)
                .expect("canonical")
                .data_type();
            let ok = match name {
                col::TS => matches!(from, DataType::Timestamp(_, _)),
                col::METRIC => is_string(from),
                col::VALUE => from.is_numeric(),
                _ => can_cast_types(from, to),
            } && can_cast_types(from, to);
            if !ok {
                let want = match name {
                    col::TS => "a timestamp, e.g. CAST(x AS TIMESTAMP)",
                    col::METRIC => "a string",
                    col::VALUE => "a number",
                    _ => "the labels map",
                };
                return Err(format!("column `{name}` is {from}; it must be {want}"));
            }
            Ok(i)
        };
        let (ts, metric, labels, value) = (
            find(col::TS)?,
            find(col::METRIC)?,
            find(col::LABELS)?,
            find(col::VALUE)?,
        );
        let mut merged = Vec::new();
        for name in into_labels {
            let i = output.index_of(name).map_err(|_| {
                format!(
                    "into_labels names `{name}`, which the query's result does not have (it has {})",
                    describe(output)
                )
            })?;
            if [ts, metric, labels, value].contains(&i) {
                return Err(format!(
                    "into_labels cannot take the canonical column `{name}`"
                ));
            }
            if !can_cast_types(output.field(i).data_type(), &DataType::Utf8) {
                return Err(format!(
                    "into_labels column `{name}` is {}, which has no text form",
                    output.field(i).data_type()
                ));
            }
            merged.push((i, name.clone()));
        }
        let series_id = match output.index_of(col::SERIES_ID) {
            Ok(i) if merged.is_empty() => {
                if output.field(i).data_type() != &DataType::UInt64 {
                    return Err(format!(
                        "column `series_id` is {}; leave it out and the stage computes it",
                        output.field(i).data_type()
                    ));
                }
                Some(i)
            }
            _ => None,
        };
        let taken: Vec<usize> = [Some(ts), Some(metric), Some(labels), Some(value)]
            .into_iter()
            .chain([output.index_of(col::SERIES_ID).ok()])
            .flatten()
            .chain(merged.iter().map(|(i, _)| *i))
            .collect();
        let extra: Vec<usize> = (0..output.fields().len())
            .filter(|i| !taken.contains(i))
            .collect();
        let mut fields: Vec<Field> = canonical
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend(extra.iter().map(|&i| output.field(i).clone()));
        Ok(Self {
            schema: Arc::new(Schema::new(fields)),
            ts,
            metric,
            labels,
            value,
            series_id,
            into_labels: merged,
            extra,
        })
    }

    pub(super) fn apply(&self, out: &RecordBatch) -> Result<RecordBatch> {
        let canonical = schema::metrics_schema();
        let options = CastOptions {
            safe: false,
            format_options: FormatOptions::default(),
        };
        let cast = |i: usize, name: &str| -> Result<ArrayRef> {
            let array = out.column(i);
            if array.null_count() > 0 {
                return Err(Error::schema(
                    STAGE,
                    format!(
                        "the query returned NULL in `{name}` for {} of {} rows; filter them with WHERE {name} IS NOT NULL",
                        array.null_count(),
                        out.num_rows()
                    ),
                ));
            }
            let to = canonical
                .field_with_name(name)
                .expect("canonical")
                .data_type();
            if array.data_type() == to {
                return Ok(array.clone());
            }
            // Strings of any flavour become Utf8 first: not every one casts to a dictionary.
            let array = if name == col::METRIC && !matches!(array.data_type(), DataType::Utf8) {
                cast_with_options(array, &DataType::Utf8, &options)?
            } else {
                array.clone()
            };
            Ok(cast_with_options(&array, to, &options)?)
        };
        let ts = cast(self.ts, col::TS)?;
        let metric = cast(self.metric, col::METRIC)?;
        let mut labels = cast(self.labels, col::LABELS)?;
        let value = cast(self.value, col::VALUE)?;
        let mut merged_ids = None;
        if !self.into_labels.is_empty() {
            let (merged, ids) = self.merge_labels(out, &metric, &labels, &options)?;
            labels = merged;
            merged_ids = Some(ids);
        }
        let series_id: ArrayRef = match (self.series_id, merged_ids) {
            (_, Some(ids)) => Arc::new(ids),
            (Some(i), None) if out.column(i).null_count() == 0 => out.column(i).clone(),
            _ => Arc::new(series_ids(&metric, &labels)?),
        };
        let mut columns = vec![ts, metric, labels, value, series_id];
        columns.extend(self.extra.iter().map(|&i| out.column(i).clone()));
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }

    /// `labels` with the `into_labels` columns added (replacing a label of the same name;
    /// keys kept sorted), and the series ids of the new labels, in one pass that borrows
    /// every string rather than copying it.
    fn merge_labels(
        &self,
        out: &RecordBatch,
        metric: &ArrayRef,
        labels: &ArrayRef,
        options: &CastOptions<'_>,
    ) -> Result<(ArrayRef, UInt64Array)> {
        let texts: Vec<(ArrayRef, &str)> = self
            .into_labels
            .iter()
            .map(|(i, name)| {
                Ok((
                    cast_with_options(out.column(*i), &DataType::Utf8, options)?,
                    name.as_str(),
                ))
            })
            .collect::<Result<_>>()?;
        let texts: Vec<(&StringArray, &str)> = texts
            .iter()
            .map(|(array, name)| (array.as_string::<i32>(), *name))
            .collect();
        let metric = metric_names(metric)?;
        let map = labels.as_map();
        let rows = map.len();
        let mut builder = MapBuilder::with_capacity(
            None,
            StringBuilder::with_capacity(rows * 4, rows * 32),
            StringBuilder::with_capacity(rows * 4, rows * 32),
            rows,
        );
        let mut ids = Vec::with_capacity(rows);
        let mut scratch = Vec::with_capacity(128);
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for row in 0..rows {
            pairs.clear();
            row_labels(map, row, &mut pairs);
            for (text, name) in &texts {
                if text.is_valid(row) {
                    pairs.push((name, text.value(row)));
                }
            }
            schema::sort_labels(&mut pairs);
            for (k, v) in &pairs {
                builder.keys().append_value(k);
                builder.values().append_value(v);
            }
            builder.append(true)?;
            ids.push(schema::series_id_with(
                &mut scratch,
                metric.value(row),
                pairs.iter().copied(),
            ));
        }
        Ok((Arc::new(builder.finish()), UInt64Array::from(ids)))
    }
}

/// The labels of `row` of a canonical labels map, borrowed from the map's arrays.
fn row_labels<'a>(map: &'a MapArray, row: usize, out: &mut Vec<(&'a str, &'a str)>) {
    let keys = map.keys().as_string::<i32>();
    let values = map.values().as_string::<i32>();
    let offsets = map.value_offsets();
    let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
    out.extend(
        (start..end)
            .filter(|&j| values.is_valid(j))
            .map(|j| (keys.value(j), values.value(j))),
    );
}

fn metric_names(metric: &ArrayRef) -> Result<TypedDictionaryArray<'_, Int32Type, StringArray>> {
    metric
        .as_dictionary::<Int32Type>()
        .downcast_dict::<StringArray>()
        .ok_or_else(|| Error::schema(STAGE, "metric is not a string dictionary"))
}

/// The canonical series id of every row.
fn series_ids(metric: &ArrayRef, labels: &ArrayRef) -> Result<UInt64Array> {
    let metric = metric_names(metric)?;
    let map = labels.as_map();
    let mut ids = Vec::with_capacity(map.len());
    let mut scratch = Vec::with_capacity(128);
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for row in 0..map.len() {
        pairs.clear();
        row_labels(map, row, &mut pairs);
        schema::sort_labels(&mut pairs);
        ids.push(schema::series_id_with(
            &mut scratch,
            metric.value(row),
            pairs.iter().copied(),
        ));
    }
    Ok(UInt64Array::from(ids))
}

fn is_string(t: &DataType) -> bool {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => is_string(v),
        _ => false,
    }
}
